"""A unit's flows: leased to a car; its result judged (docs/verification.md) and, as the judgement allows,
metered, booked, counted and the buyer told, or refused; the platform's arbitration; and a caught car's
unchecked results voided and their earnings clawed back."""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import services as billing
from fleet import services as fleet
from fleet.models import WorkUnit
from marketplace import buyer_webhooks, services as market
from marketplace.flows.locks import JobLocks, job_lock, unit_lock
from marketplace.models import Job


def units_lease(*, vehicle_id: int, max_units: int | None = None,
                inflight_limit: int | None = None) -> tuple[list[WorkUnit], str]:
    """Lease the car a batch of units of the best-paying job it won capacity for (fleet.services.units_lease
    says which and how many), drawn from the car's allocation in the same transaction. Returns (units, "") or
    ([], why not). A queued job is marked running after its first lease, in a transaction of its own, so that
    leasing (the car's row, then units it claims without waiting) never waits for a job's lock."""
    with transaction.atomic():
        units, reason = fleet.units_lease(vehicle_id=vehicle_id, max_units=max_units, inflight_limit=inflight_limit)
        if units:
            market.allocation_draw(allocation_id=units[0].allocation.pk, mops=sum(unit.mops for unit in units))
    if units and units[0].job.state == Job.State.QUEUED:
        market.job_start(job_id=units[0].job_id)
    return units, reason


def _verdict_book(*, locks: JobLocks, unit: WorkUnit, verdict: fleet.Verdict) -> None:
    """Book what a judgement settled, in its transaction: the results it pays (the buyer's reservation for the
    unit's result, the platform for a check) and counts as delivered work, and the unit counted done; the last one completes the job and
    releases the rest of its reservation."""
    for payment in verdict.payments:
        # What the car delivered (its proven capacity): results that stand, when they are settled.
        fleet.vehicle_rate_record(vehicle_id=payment.vehicle.pk, precision=locks.job.precision, mops=unit.mops,
                                  duration_ms=payment.duration_ms, now=payment.ended_at)
        if payment.role == "check":
            billing.check_record(unit=unit, vehicle=payment.vehicle, epoch=payment.epoch,
                                 price_micros=payment.price_micros, energy_mwh=payment.energy_mwh,
                                 duration_ms=payment.duration_ms)
        else:
            billing.usage_record(unit=unit, vehicle=payment.vehicle, price_micros=payment.price_micros,
                                 energy_mwh=payment.energy_mwh, duration_ms=payment.duration_ms,
                                 reservation=locks.reservation, epoch=payment.epoch)
    if verdict.done and market.job_unit_done(job=locks.job):
        billing.reservation_release(job=locks.job)  # the rest of its budget back to the balance at once
    if verdict.arbitrate:
        transaction.on_commit(lambda: unit_arbitrate_later(unit_id=unit.pk))


def _verdict_after(verdict: fleet.Verdict) -> None:
    """What a judgement changes beyond its unit, each in a transaction of its own (a car's row comes before
    the units in the lock order): the standing of the cars it found right, and the cars it caught."""
    if verdict.passed or verdict.accepted:
        fleet.vehicles_standing_record(passed=verdict.passed, accepted=verdict.accepted)
    for vehicle_id in verdict.caught:
        vehicle_caught(vehicle_id=vehicle_id)


def unit_complete(*, vehicle_id: int, unit_id: int, epoch: int, result: list) -> tuple[bool, str]:
    """A car's result for its current lease of a unit: judged (fleet.services.unit_result_accept), and what the
    judgement settles booked (:func:`_verdict_book`). Returns (accepted, reason): a result for a stale, expired,
    withdrawn or foreign lease is refused and not paid; a malformed one is refused and its unit requeued for
    another car. A well-formed result is accepted whatever its judgement: the car cannot tell a checked unit
    from another, nor a result found wrong (it is not paid, and its car is caught)."""
    with transaction.atomic():
        locked = unit_lock(unit_id=unit_id)
        if locked is None:
            return False, "stale_lease"
        locks, unit = locked
        verdict, reason = fleet.unit_result_accept(unit=unit, vehicle_id=vehicle_id, epoch=epoch,
                                                   result=result)
        if verdict is None:
            return False, reason
        _verdict_book(locks=locks, unit=unit, verdict=verdict)
    _verdict_after(verdict)
    return True, ""


def unit_arbitrate_later(*, unit_id: int) -> None:
    """Have a Celery worker compute the unit's reference and arbitrate (in process in the embedded profile)."""
    from marketplace import tasks  # the tasks module imports the flows: a cycle at module level
    tasks.unit_arbitrate.delay(unit_id)


def units_reference_later(*, unit_ids: list[int]) -> None:
    """Have a Celery worker compute the known answers of a job's canaries."""
    from marketplace import tasks  # as above
    tasks.units_reference.delay(unit_ids)


def units_verify_sweep() -> int:
    """Periodic: units whose replica no car of another owner took within REPLICA_WAIT_S, and units whose
    arbitration did not happen (a worker lost), go to the platform. Returns how many."""
    overdue = fleet.units_verify_overdue(now=timezone.now())
    for unit_id in overdue:
        unit_arbitrate_later(unit_id=unit_id)
    return len(overdue)


def unit_arbitrate(*, unit_id: int) -> bool:
    """The platform computes a unit with the reference runtime (outside any transaction), then judges the
    results waiting on it (fleet.services.unit_arbitrate) and books what that settles. Returns whether it ran."""
    reference = fleet.unit_reference_compute(unit_id=unit_id)
    if reference is None:
        return False
    with transaction.atomic():
        locked = unit_lock(unit_id=unit_id)
        if locked is None:
            return False
        locks, unit = locked
        if unit.verify != WorkUnit.Verify.ARBITER or locks.job.data_deleted_at is not None:
            return False
        corrected = unit.state == WorkUnit.State.DONE
        verdict = fleet.unit_arbitrate(unit=unit, reference=reference)
        _verdict_book(locks=locks, unit=unit, verdict=verdict)
        if corrected:  # a row the buyer may have had already: tell them it changed
            buyer_webhooks.job_rows_corrected_record(job=locks.job, rows=[doc.get("id") for doc in unit.inputs])
    _verdict_after(verdict)
    if corrected:  # and in a batch's output file, if it was written
        market.batch_output_rewrite(job_id=unit.job_id)
    return True


def units_reference(*, unit_ids: list[int]) -> int:
    """Compute the known answers of canaries (fleet.services.units_canaries_pick); returns how many were set."""
    done = 0
    for unit_id in unit_ids:
        reference = fleet.unit_reference_compute(unit_id=unit_id)
        if reference is not None:
            done += fleet.unit_reference_set(unit_id=unit_id, reference=reference)
    return done


def vehicle_caught(*, vehicle_id: int) -> int:
    """A result of the car was found wrong: its standing falls (past a threshold it is suspended), and its
    results accepted unchecked within the payout holdback are voided: their earnings clawed back, their units
    computed again (a job still open) or corrected by the platform (a job whose results went out). Each job in
    a transaction of its own, locked in the documented order. Returns how many results were voided."""
    now = timezone.now()
    fleet.vehicle_wrong_record(vehicle_id=vehicle_id, now=now)
    since = now - timedelta(days=settings.STRIPE_PAYOUT_HOLDBACK_DAYS)
    voided = 0
    for job_id, refs in fleet.units_void_pick(vehicle_id=vehicle_id, since=since).items():
        with transaction.atomic():
            locks = job_lock(job_id=job_id)
            reopen = locks.job.state in Job.OPEN_STATES
            units = fleet.units_void(job=locks.job, vehicle_id=vehicle_id, refs=refs, reopen=reopen)
            for unit, epoch in units:
                billing.clawback(unit=unit, epoch=epoch, reason="car caught", reservation=locks.reservation)
                if reopen:
                    market.job_unit_undone(job=locks.job)
                elif locks.job.data_deleted_at is None:  # its data deleted: no row to correct
                    transaction.on_commit(lambda pk=unit.pk: unit_arbitrate_later(unit_id=pk))
            voided += len(units)
    return voided
