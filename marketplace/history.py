"""A job's history (marketplace.models.JobEvent): one function, called in the transaction that makes the change,
by the market's services and by the dispatcher (fleet), which cannot import marketplace.services."""

from marketplace.models import Job, JobEvent


def job_history_add(*, job: Job, kind: str, detail: str = "", by=None) -> JobEvent:
    return JobEvent.objects.create(job=job, kind=kind, detail=detail[:300], by=by)
