from celery import shared_task

from marketplace import services


@shared_task(ignore_result=True, max_retries=0)
def auction_tick() -> int:
    """Clear one auction interval (periodic: beat in the services profile, the in-process scheduler in the
    embedded one)."""
    return len(services.auction_tick())
