from celery import shared_task

from marketplace import services


@shared_task(ignore_result=True, max_retries=0)
def auction_tick() -> int:
    """Clear one auction interval (periodic: beat in the services profile, the in-process scheduler in the
    embedded one)."""
    return len(services.auction_tick())


@shared_task(ignore_result=True, max_retries=0)
def demo_job_top_up() -> None:
    """Embedded demo only (`make run`): keep the demo buyer's job queue from running dry."""
    from marketplace.demo import demo_job_top_up as top_up

    top_up()
