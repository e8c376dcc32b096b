"""A unit's flows: leased to a car, and its result accepted (metered, booked, counted, the buyer told) or
refused."""

from django.db import transaction

from billing import services as billing
from fleet import services as fleet
from fleet.models import WorkUnit
from marketplace import services as market
from marketplace.flows.locks import unit_lock
from marketplace.models import Job


def units_lease(*, vehicle_id: int, max_units: int | None = None) -> tuple[list[WorkUnit], str]:
    """Lease the car a batch of units of the best-paying job it won capacity for (fleet.services.units_lease
    says which and how many), drawn from the car's allocation in the same transaction. Returns (units, "") or
    ([], why not). A queued job is marked running after its first lease, in a transaction of its own, so that
    leasing (the car's row, then units it claims without waiting) never waits for a job's lock."""
    with transaction.atomic():
        units, reason = fleet.units_lease(vehicle_id=vehicle_id, max_units=max_units)
        if units:
            market.allocation_draw(allocation_id=units[0].allocation.pk, mops=sum(unit.mops for unit in units))
    if units and units[0].job.state == Job.State.QUEUED:
        market.job_start(job_id=units[0].job_id, vehicle_id=vehicle_id)
    return units, reason


def unit_complete(*, vehicle_id: int, unit_id: int, epoch: int, embeddings_b64: list[str]) -> tuple[bool, str]:
    """A car's result for its current lease of a unit: accepted, metered and booked (the reservation drawn,
    the owner credited, the platform's fee), the job's progress counted and the buyer told; the last unit
    completes the job and releases the rest of its reservation. Returns (accepted, reason): a result for a
    stale, expired, withdrawn or foreign lease is refused and not paid; a malformed one is refused and its
    unit requeued for another car."""
    with transaction.atomic():
        locked = unit_lock(unit_id=unit_id)
        if locked is None:
            return False, "stale_lease"
        locks, unit = locked
        completion, reason = fleet.unit_result_accept(unit=unit, vehicle_id=vehicle_id, epoch=epoch,
                                                      embeddings_b64=embeddings_b64)
        if completion is None:
            return False, reason
        fleet.vehicle_rate_record(vehicle_id=vehicle_id, precision=unit.job.precision, mops=unit.mops,
                                  duration_ms=completion.duration_ms, now=unit.completed_at)
        billing.usage_record(unit=unit, vehicle=completion.vehicle, price_micros=unit.price_micros,
                             energy_mwh=completion.energy_mwh, duration_ms=completion.duration_ms,
                             reservation=locks.reservation)
        if market.job_unit_done(job=locks.job):
            billing.reservation_release(job=locks.job)  # the rest of its budget back to the balance at once
    return True, ""
