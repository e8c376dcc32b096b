"""What buyers may know of a market (reads only): the capacity cars offer now, by reserve price, and what a
job would cost and take if the fleet stays as it is now. Aggregates only: never one car, bid or buyer.

Depth is read live from the cars that would offer in the next round (fleet.selectors.vehicles_offering, the
auction's own supply rule) and cached for DEPTH_CACHE_S, so that pages and estimates do not each walk the
fleet."""

from dataclasses import dataclass
from datetime import datetime

from django.core.cache import cache
from django.db.models import Q, Sum
from django.utils import timezone

from billing.money import charge_femto, femto_to_minor_ceil
from fleet.models import WorkUnit
from fleet.selectors import vehicles_offering
from marketplace.models import PRECISION_CHOICES, Job
from marketplace.selectors import last_clearing_price

DEPTH_CACHE_S = 10


@dataclass(frozen=True)
class Depth:
    """Supply of one precision class now: (reserve price, mega-ops per second offered at it), cheapest first."""

    precision: str
    steps: tuple[tuple[int, float], ...]
    cars: int

    def rate_at(self, price_micros: int) -> float:
        """Mega-ops per second offered at reserves at or below ``price_micros``."""
        return sum(rate for price, rate in self.steps if price <= price_micros)

    @property
    def cheapest_micros(self) -> int | None:
        return self.steps[0][0] if self.steps else None

    @property
    def total_rate(self) -> float:
        return sum(rate for _, rate in self.steps)


def market_depth(*, precision: str, now: datetime | None = None) -> Depth:
    key = f"market-depth:{precision}"
    depth = cache.get(key)
    if depth is None:
        by_price: dict[int, float] = {}
        offering = vehicles_offering(precision=precision, now=now or timezone.now())
        for vehicle, rate, _ in offering:
            price = vehicle.policy.reserve_price_micros
            by_price[price] = by_price.get(price, 0.0) + rate
        depth = Depth(precision=precision, steps=tuple(sorted(by_price.items())), cars=len(offering))
        cache.set(key, depth, DEPTH_CACHE_S)
    return depth


def market_depths() -> list[Depth]:
    now = timezone.now()
    return [market_depth(precision=precision, now=now) for precision, _ in PRECISION_CHOICES]


def queued_mops_ahead(*, precision: str, max_price_micros: int, exclude_job_id: int | None = None) -> int:
    """Mega-ops still queued by open jobs of the market that bid at least ``max_price_micros``: the auction
    serves them first (an equal bid by an older job wins the tie)."""
    jobs = Job.objects.filter(state__in=Job.OPEN_STATES, precision=precision, max_price_micros__gte=max_price_micros)
    if exclude_job_id is not None:
        jobs = jobs.exclude(pk=exclude_job_id)
    queued = jobs.aggregate(mops=Sum("units__mops", filter=Q(units__state=WorkUnit.State.QUEUED)))["mops"]
    return queued or 0


@dataclass(frozen=True)
class Estimate:
    """What a job of ``mops`` mega-ops bidding ``max_price_micros`` would cost and take, if the fleet and the
    other bids stay as they are now. Costs in the currency's minor units, rounded up."""

    mops: int
    max_price_micros: int
    last_price_micros: int | None
    cost_at_last_price_minor: int | None
    cost_at_most_minor: int
    rate_at_bid: float
    cars: int
    cheapest_micros: int | None
    queued_ahead_mops: int
    seconds: float | None

    @property
    def bid_below_supply(self) -> bool:
        """No car offers at or below the bid: the job waits until one does or the bid is raised."""
        return self.rate_at_bid <= 0


def _minor_up(*, mops: int, price_micros: int, currency: str) -> int:
    return femto_to_minor_ceil(femto=charge_femto(mops=mops, price_micros=price_micros), currency=currency)


def job_estimate(*, precision: str, max_price_micros: int, mops: int, currency: str,
                 exclude_job_id: int | None = None) -> Estimate:
    depth = market_depth(precision=precision)
    last = last_clearing_price(precision=precision)
    rate = depth.rate_at(max_price_micros)
    ahead = queued_mops_ahead(precision=precision, max_price_micros=max_price_micros, exclude_job_id=exclude_job_id)
    return Estimate(
        mops=mops, max_price_micros=max_price_micros, last_price_micros=last,
        # a round never clears above the bid, so at most the bid; likely near the last price if it is lower
        cost_at_last_price_minor=None if last is None else _minor_up(mops=mops, price_micros=min(last, max_price_micros),
                                                                     currency=currency),
        cost_at_most_minor=_minor_up(mops=mops, price_micros=max_price_micros, currency=currency),
        rate_at_bid=rate, cars=depth.cars, cheapest_micros=depth.cheapest_micros, queued_ahead_mops=ahead,
        seconds=(ahead + mops) / rate if rate > 0 else None,
    )
