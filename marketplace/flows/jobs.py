"""A job's flows: created with its units and reservation, its terms changed, closed (cancelled, expired) with
its release, and the auction tick that closes overdue jobs before it clears."""

from datetime import datetime
from typing import BinaryIO, Iterable

from django.db import transaction

from billing import services as billing
from fleet import services as fleet
from fleet.models import WorkUnit
from marketplace import selectors, services as market
from marketplace.flows.locks import job_lock
from marketplace.flows.units import units_reference_later
from marketplace.models import AuctionRound, Job, Organisation, User


def job_create_from(*, organisation: Organisation, user: User | None, draft: market.JobDraft) -> Job:
    """Save a prepared job (marketplace.services.job_prepare) and its units and reserve its budget, in one short
    transaction. Refused with ``insufficient_balance`` (402) when the organisation's balance does not cover the
    reservation: its budget cap, or without one the cost of all its work at its bid. Nothing is kept then."""
    try:
        with transaction.atomic():
            job = market.job_record(organisation=organisation, user=user, draft=draft)
            fleet.units_create(job=job, units=market.draft_units(draft))
            # Buyers pay in advance: the job reserves its budget from the balance, or nothing is created.
            billing.reservation_create(job=job, amount_minor=selectors.job_reservation_needed_minor(
                job=job, queued_mops=draft.mops_total))
            # Its canaries: units whose answer the platform computes itself (docs/verification.md).
            if canaries := fleet.units_canaries_pick(job=job):
                transaction.on_commit(lambda: units_reference_later(unit_ids=canaries))
    finally:
        draft.units.close()
    return job


def job_create(*, organisation: Organisation, user: User | None, model_slug: str, precision: str,
               max_price_micros: int, deadline: datetime, inputs: BinaryIO | Iterable[bytes],
               budget_cap_minor: int | None = None, params: dict | None = None) -> Job:
    """Create a job from JSON Lines inputs: marketplace.services.job_prepare (the workload's parameters and
    every line checked, bad lines reported by number, nothing created unless the whole file is good), then
    :func:`job_create_from`."""
    draft = market.job_prepare(model_slug=model_slug, precision=precision, max_price_micros=max_price_micros,
                               deadline=deadline, inputs=inputs, budget_cap_minor=budget_cap_minor, params=params)
    return job_create_from(organisation=organisation, user=user, draft=draft)


def job_close(*, job_id: int, state: str, reason: str, by: User | None = None) -> None:
    """Close an open job as cancelled or expired: its active leases are withdrawn (the cars are told), its queued
    units cancelled and the rest of its reserved budget returned to the balance, all at once. Finished units
    stay paid. A job already closed is left as it is. (A job completes in marketplace.flows.unit_complete.)"""
    with transaction.atomic():
        locks = job_lock(job_id=job_id, unit_states=(WorkUnit.State.QUEUED, WorkUnit.State.LEASED))
        if locks.job.state not in Job.OPEN_STATES:
            return
        fleet.units_stop(job_id=job_id, units=locks.units, reason=reason)
        market.job_close(job=locks.job, state=state, reason=reason, by=by)
        billing.reservation_release(job=locks.job)


def job_cancel(*, job: Job, by: User | None = None) -> Job:
    """Stop a job at its buyer's request (see :func:`job_close`)."""
    job_close(job_id=job.pk, state=Job.State.CANCELLED, reason="job_cancelled", by=by)
    job.refresh_from_db()
    return job


def jobs_expire() -> int:
    """Close every open job whose deadline has passed."""
    overdue = market.jobs_overdue()
    for job_id in overdue:
        job_close(job_id=job_id, state=Job.State.EXPIRED, reason="job_expired")
    return len(overdue)


def job_bid_update(*, job: Job, max_price_micros: int, by: User | None = None) -> Job:
    """Raise or lower an open job's sealed bid; it takes part in the next auction round at the new price
    (marketplace.services.job_bid_set). A job without a budget cap has its reservation resized to its
    remaining work at the new bid (raising it is refused with ``insufficient_balance`` when the balance
    cannot cover the difference)."""
    market.job_bid_check(max_price_micros=max_price_micros)
    with transaction.atomic():
        job = job_lock(job_id=job.pk).job
        market.job_bid_set(job=job, max_price_micros=max_price_micros, by=by)
        if job.budget_cap_minor is None:  # its reservation pays for all its work at the bid: resize it
            billing.reservation_resize(job=job, amount_minor=selectors.job_reservation_needed_minor(job=job))
    return job


def job_budget_update(*, job: Job, budget_cap_minor: int | None, by: User | None = None) -> Job:
    """Set, raise, lower or remove (None) an open job's budget cap, and resize its reservation to match: the
    cap, or without one the cost of its remaining work at its bid (``insufficient_balance`` when the balance
    cannot cover a raise). The next auction round bids within it. A cap below what the job has already spent
    and committed keeps that much reserved and stops its bidding; nothing already leased is taken back."""
    market.job_budget_check(budget_cap_minor=budget_cap_minor)
    with transaction.atomic():
        job = job_lock(job_id=job.pk).job
        market.job_budget_set(job=job, budget_cap_minor=budget_cap_minor, by=by)
        billing.reservation_resize(job=job, amount_minor=selectors.job_reservation_needed_minor(job=job))
    return job


UNCHANGED = object()  # job_terms_update: leave the budget cap as it is


def job_terms_update(*, job: Job, max_price_micros: int | None = None, budget_cap_minor=UNCHANGED,
                     by: User | None = None) -> Job:
    """Change an open job's bid (None: keep it) and budget cap (UNCHANGED: keep it; None: remove it) together,
    both or neither. A new cap goes first, so a raised bid is reserved within it; a removed cap last, so the
    reservation follows the work at the new bid."""
    changes = []
    if max_price_micros is not None:
        changes.append(lambda job: job_bid_update(job=job, max_price_micros=max_price_micros, by=by))
    if budget_cap_minor is not UNCHANGED:
        change = lambda job: job_budget_update(job=job, budget_cap_minor=budget_cap_minor, by=by)  # noqa: E731
        changes.insert(0 if budget_cap_minor is not None else len(changes), change)
    with transaction.atomic():
        for change in changes:
            job = change(job)
    return job


def auction_tick() -> list[AuctionRound]:
    """One auction interval: close overdue jobs, release what finished jobs still hold reserved (after a crash
    between a job's closing and its release), then clear every market that has demand, jointly
    (marketplace.services.auction_clear)."""
    jobs_expire()
    billing.reservations_release_finished()
    return market.auction_clear()
