"""What a car's result is checked against, and how often: pure rules, no ORM (docs/verification.md).

A car is a stranger: a result of the right shape is a claim, not a right result. Three checks stand behind
every accepted result, and a car cannot tell which (if any) applies to a unit it computes:

* **canaries**: a share of every job's units have an answer the platform computed itself with the reference
  runtime (they are the buyer's own units, so they look like every other unit because they are one);
* **replication**: a sample of the other units, drawn at :func:`replication_rate` from the car's standing,
  is computed again by a car of another owner and the two results compared (:func:`results_agree`);
* **arbitration**: when two results disagree, or no car of another owner is there to replicate, the
  platform computes the unit with the reference runtime and the result that agrees with it wins.

A result that disagrees with the reference is *wrong*: it is not paid, its unit is computed again, and its
car is caught (:func:`standing_after_wrong`).
"""

import base64
import binascii
import math
from dataclasses import dataclass

import numpy as np

#: The smallest cosine, row by row, at which two results of one unit at one precision agree. Measured
#: (tests/bench/tolerance.py; the figures and what still passes are in docs/verification.md): honest int8
#: runs agree to 0.9975 at worst (onnxruntime's graph optimisation levels), honest fp32 runs to 1 - 5e-13; the
#: closest cheats that save work (a text's first half, a near-identical paragraph replayed) reach 0.984-0.988 at
#: int8 and 0.9983 at fp32 (the int8 result sent for an fp32 job).
MIN_COSINE = {"int8": 0.99, "fp32": 0.9999}
#: Wrong results within STRIKE_MEMORY_DAYS that suspend a car (docs/verification.md, "Consequences").
SUSPEND_AFTER_WRONG = 2
STRIKE_MEMORY_DAYS = 30


def decode_rows(rows_b64: list[str]) -> np.ndarray:
    """A result's rows (base64 little-endian float32, checked for shape already) as a float64 matrix."""
    return np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows_b64]).astype(np.float64)


def row_cosines(a_b64: list[str], b_b64: list[str]) -> np.ndarray:
    """Cosine of each row of one result with the same row of another (rows of unequal count: -1 each)."""
    if len(a_b64) != len(b_b64) or not a_b64:
        return np.full(max(len(a_b64), len(b_b64), 1), -1.0)
    try:
        a, b = decode_rows(a_b64), decode_rows(b_b64)
    except (binascii.Error, ValueError):
        return np.full(len(a_b64), -1.0)
    if a.shape != b.shape:
        return np.full(len(a_b64), -1.0)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)


def results_agree(a_b64: list[str], b_b64: list[str], *, precision: str) -> bool:
    """Whether two results of one unit are the same embeddings, within the precision's tolerance, row by row
    (each row on its own: one wrong row makes the result wrong)."""
    return bool(np.all(row_cosines(a_b64, b_b64) >= MIN_COSINE[precision]))


@dataclass(frozen=True)
class Standing:
    """What the checks have shown of one car: results accepted since its last wrong one (``streak``), and
    its wrong results within STRIKE_MEMORY_DAYS."""

    streak: int = 0
    wrong_recent: int = 0


def replication_rate(standing: Standing, *, probation: int, floor: float) -> float:
    """The chance that a result of a car with this standing is computed again by another car: 1 for its first
    ``probation`` results and after a wrong one, then ``probation / (streak + 1)``, never below ``floor``
    (the operator's VERIFY_PROBATION and VERIFY_REPLICATION_FLOOR)."""
    if standing.wrong_recent or standing.streak < probation:
        return 1.0
    return max(floor, probation / (standing.streak + 1))


def standing_after_wrong(standing: Standing) -> tuple[Standing, bool]:
    """A car's standing after a wrong result, and whether it is suspended now."""
    after = Standing(streak=0, wrong_recent=standing.wrong_recent + 1)
    return after, after.wrong_recent >= SUSPEND_AFTER_WRONG


def miss_chance(*, rate: float, wrong_units: int) -> float:
    """The chance that a car which sends ``wrong_units`` wrong results, each checked with probability
    ``rate`` independently, is not caught on any of them: (1 - rate) ** wrong_units."""
    return (1.0 - rate) ** wrong_units


def units_to_catch(*, rate: float, quantile: float) -> int:
    """Wrong results a car sends, each checked at ``rate``, before it is caught with probability ``quantile``."""
    if rate >= 1.0:
        return 1
    return max(1, math.ceil(math.log(1.0 - quantile) / math.log(1.0 - rate)))
