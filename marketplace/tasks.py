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


@shared_task(ignore_result=True, max_retries=0)
def webhooks_send() -> int:
    """Send the webhook deliveries that are due: first attempts and retries after their backoff (periodic:
    the database says what is due, so a lost or late run delays deliveries and loses none)."""
    from marketplace import webhooks

    return webhooks.deliveries_send()


@shared_task(ignore_result=True, max_retries=0)
def idempotency_keys_purge() -> int:
    """Forget Idempotency-Keys older than 24 hours (periodic)."""
    from marketplace.idempotency import idempotency_keys_purge as purge

    return purge()
