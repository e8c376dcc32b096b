from celery import shared_task


@shared_task(ignore_result=True, max_retries=0)
def settlement_run() -> str:
    """This ISO week's owner settlement (periodic, hourly: the first call of a week that finds an owner to
    pay books and sends the payouts; later calls only retry transfers still pending after a timeout)."""
    from billing.payouts import settlement_run as run

    result = run()
    return result.transfer_group if result else ""


@shared_task(ignore_result=True, max_retries=0)
def pending_retry() -> int:
    """Finish top-ups and refunds whose Stripe answer was lost, then make the automatic top-ups that are
    due (periodic, every few minutes)."""
    from billing.payments import auto_top_ups_run, pending_retry as retry

    return retry() + auto_top_ups_run()
