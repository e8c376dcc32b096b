"""The workloads buyers can run (docs/workloads.md). Each is one module of this package that defines ``WORKLOAD``
(a fleet.workloads.base.Workload: its inputs, costs, result checks, verification tolerance and batch format),
and one module of fleet.agent.workloads (its runtime on the car). A module added here is found at start-up:
the market, the pages, the APIs, the owners' consent choices and the catalogue all read this registry."""

import importlib
import pkgutil

from fleet.workloads.base import BadInput, CatalogueEntry, ModelInfo, PriceUnit, Workload

__all__ = ["WORKLOADS", "BadInput", "CatalogueEntry", "ModelInfo", "PriceUnit", "Workload", "categories", "get"]


def _discover() -> dict[str, Workload]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        workload = getattr(importlib.import_module(f"{__name__}.{info.name}"), "WORKLOAD", None)
        if workload is not None:
            found.append(workload)
    return {w.task: w for w in sorted(found, key=lambda w: (w.order, w.task))}


WORKLOADS: dict[str, Workload] = _discover()


def get(task: str) -> Workload:
    try:
        return WORKLOADS[task]
    except KeyError:
        raise LookupError(f"unknown workload {task!r}; known: {', '.join(WORKLOADS)}") from None


def categories() -> list[tuple[str, str, str]]:
    """(task, title, what it is in plain words) of every workload: what an owner consents to."""
    return [(w.task, w.title, w.consent) for w in WORKLOADS.values()]
