"""The car's side of each workload (docs/workloads.md): one module per workload task, beside its server side in
fleet.workloads, defining ``run(inputs, params, infer) -> list``: a unit's result, one JSON-able item per
document, from its documents' inputs (texts, or page images in base64), the job's parameters for the car
(fleet.workloads.base.Workload.unit_params) and ``infer``, the runtime's model (an encoder: texts -> unit-length
float32 rows; OCR: images -> page readings; the simulator's cheats replace it). The platform computes its
reference results with the same code (fleet.services.unit_reference_compute)."""

import importlib
import pkgutil
from collections.abc import Callable

import numpy as np

Infer = Callable[[list[str]], np.ndarray | list]


def _discover() -> dict[str, Callable]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found[module.TASK] = module.run
    return found


RUNTIMES: dict[str, Callable] = _discover()


def compute(task: str, texts: list[str], params: dict, embed: Infer) -> list:
    """A unit's result for ``task``."""
    try:
        run = RUNTIMES[task]
    except KeyError:
        raise LookupError(f"this agent cannot run {task!r}; it runs {', '.join(RUNTIMES)}") from None
    return run(texts, params, embed)
