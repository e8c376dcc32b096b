from celery import shared_task

from fleet import services


@shared_task(ignore_result=True, max_retries=0)
def leases_sweep() -> int:
    """Requeue expired leases and mark silent cars offline (periodic)."""
    return services.leases_sweep()
