"""The one place that takes a job's row locks, in the order docs/concurrency.md writes down.

Every flow that changes a job, its reservation or its units takes them through :func:`job_lock` (or
:func:`unit_lock`, for a car's result): the job's reservation (billing), then the job (marketplace), then the
units it needs (fleet), in id order. The services each flow then calls lock their own rows again, which in
the same transaction waits for nothing. A car's own row, when a flow needs it, comes before all of these, and
ledger accounts after them (billing.services.accounts_lock, in id order). On SQLite (one writer) the locks
are no-ops and the order costs nothing."""

from dataclasses import dataclass, field

from billing.models import Reservation
from fleet.models import WorkUnit
from marketplace.models import Job

@dataclass
class JobLocks:
    reservation: Reservation | None
    job: Job
    units: list = field(default_factory=list)


def job_lock(*, job_id: int, unit_states: tuple[str, ...] = ()) -> JobLocks:
    """Lock a job's reservation, the job, and its units in ``unit_states`` (as (id, state, car, epoch) rows, in
    id order). Call it inside a transaction, before any other row of the job is locked."""
    reservation = Reservation.objects.select_for_update().filter(job_id=job_id).first()
    job = Job.objects.select_for_update().select_related("ai_model", "organisation").get(pk=job_id)
    units = []
    if unit_states:
        units = list(WorkUnit.objects.select_for_update().filter(job_id=job_id, state__in=unit_states).order_by("pk")
                     .values_list("pk", "state", "leased_to_id", "lease_epoch"))
    return JobLocks(reservation=reservation, job=job, units=units)


def unit_lock(*, unit_id: int) -> tuple[JobLocks, WorkUnit] | None:
    """Lock the reservation and the job of the unit ``unit_id``, then the unit itself (its ``job`` is the locked
    job); None when there is no such unit. The reservation is found through the unit, so that the lock on it
    comes first and costs no query of its own."""
    reservation = (Reservation.objects.select_for_update(of=("self",)).filter(job__units__pk=unit_id).first())
    if reservation is not None:
        job_id = reservation.job_id
    elif (job_id := WorkUnit.objects.filter(pk=unit_id).values_list("job_id", flat=True).first()) is None:
        return None
    job = Job.objects.select_for_update().select_related("ai_model", "organisation").get(pk=job_id)
    unit = WorkUnit.objects.select_for_update().filter(pk=unit_id).first()
    if unit is None:
        return None
    unit.job = job
    return JobLocks(reservation=reservation, job=job), unit
