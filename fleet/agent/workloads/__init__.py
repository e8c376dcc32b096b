"""The car's side of each workload (docs/workloads.md): one module per workload task, beside its server side in
fleet.workloads, defining ``run(texts, params, embed) -> list``: a unit's result, one JSON-able item per
document, from its texts, the job's parameters for the car (fleet.workloads.base.Workload.unit_params) and
``embed``, the car's encoder (texts -> unit-length float32 rows; the simulator's cheats replace it). The platform
computes its reference results with the same code (fleet.services.unit_reference_compute)."""

import importlib
import pkgutil
from collections.abc import Callable

import numpy as np

Embed = Callable[[list[str]], np.ndarray]


def _discover() -> dict[str, Callable]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.TASK] = module.run
    return found


RUNTIMES: dict[str, Callable] = _discover()


def compute(task: str, texts: list[str], params: dict, embed: Embed) -> list:
    """A unit's result for ``task``."""
    try:
        run = RUNTIMES[task]
    except KeyError:
        raise LookupError(f"this agent cannot run {task!r}; it runs {', '.join(RUNTIMES)}") from None
    return run(texts, params, embed)
