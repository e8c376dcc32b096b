"""A job's data retention: its documents and results deleted on the buyer's request or when its retention
ends (docs/api.md, "Data retention and deletion"). The job row, its history, counts, meter records and ledger
stay; only the buyer's content goes: the texts and vectors its units and leases hold (fleet) and the files of
the batch it runs (marketplace)."""

from django.db import transaction

from fleet import services as fleet
from marketplace import services as market
from marketplace.flows.batches import batch_finalize
from marketplace.flows.jobs import job_cancel
from marketplace.flows.locks import job_lock
from marketplace.models import Batch, Job, User


def job_data_delete(*, job: Job, by: User | None = None) -> Job:
    """Delete a job's data now. An open job is cancelled first (marketplace.flows.job_cancel: its leases are
    withdrawn, the cars told, its unused budget released); a batch's files are written first, as for any
    cancelled batch (so that its counts and its webhook are right), and then deleted with the rest. Then, in
    one transaction holding the job's lock (reservation, then job: docs/concurrency.md), fleet wipes its units'
    and leases' content and the marketplace its batch's files. Deleting again changes nothing."""
    if job.state in Job.OPEN_STATES:
        job_cancel(job=job, by=by)
    if batch_id := Batch.objects.filter(job_id=job.pk, finalized_at=None).values_list("pk", flat=True).first():
        batch_finalize(batch_id=batch_id)
    with transaction.atomic():
        locked = job_lock(job_id=job.pk).job
        if locked.state not in Job.OPEN_STATES and locked.data_deleted_at is None:
            fleet.units_data_wipe(job_id=locked.pk)
            market.job_data_wipe(job=locked, by=by)
    job.refresh_from_db()
    return job


def jobs_data_expire() -> int:
    """Delete the data of every closed job whose retention has ended (the periodic ``jobs-data-expire`` task),
    one job per transaction. Returns how many."""
    expired = market.jobs_data_expired()
    for job_id in expired:
        job_data_delete(job=Job.objects.get(pk=job_id))
    return len(expired)
