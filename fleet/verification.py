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

import math
from dataclasses import dataclass

from fleet import workloads

#: Wrong results within STRIKE_MEMORY_DAYS that suspend a car (docs/verification.md, "Consequences").
SUSPEND_AFTER_WRONG = 2
STRIKE_MEMORY_DAYS = 30


def results_agree(a: list, b: list, *, precision: str, task: str = "embedding", params: dict | None = None) -> bool:
    """Whether two results of one unit are the same answer: the workload's comparison at the precision's
    tolerance (fleet.workloads; for embeddings, cosine row by row: one wrong row makes the result wrong)."""
    return workloads.get(task).results_agree(a, b, precision=precision, params=params or {})


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
