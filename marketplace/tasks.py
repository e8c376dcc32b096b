from celery import shared_task

from marketplace import buyer_webhooks, demo, flows, idempotency, services


@shared_task(ignore_result=True, max_retries=0)
def auction_tick() -> int:
    """Clear one auction interval (periodic: beat in the services profile, the in-process scheduler in the
    embedded one)."""
    return len(flows.auction_tick())


@shared_task(ignore_result=True, max_retries=0)
def demo_job_top_up() -> None:
    """Embedded demo only (`make run`): keep the demo buyer's job queue from running dry."""
    demo.demo_job_top_up()


@shared_task(ignore_result=True, max_retries=0)
def webhooks_send() -> int:
    """Send the webhook deliveries that are due: first attempts and retries after their backoff (periodic:
    the database says what is due, so a lost or late run delays deliveries and loses none)."""
    return buyer_webhooks.deliveries_send()


@shared_task(ignore_result=True, max_retries=0)
def idempotency_keys_purge() -> int:
    """Forget Idempotency-Keys older than 24 hours (periodic)."""
    return idempotency.idempotency_keys_purge()


@shared_task(ignore_result=True, max_retries=0)
def unit_arbitrate(unit_id: int) -> bool:
    """The platform computes a unit with the reference runtime and judges the results waiting on it."""
    return flows.unit_arbitrate(unit_id=unit_id)


@shared_task(ignore_result=True, max_retries=0)
def units_reference(unit_ids: list[int]) -> int:
    """The platform computes the known answers of a new job's canaries."""
    return flows.units_reference(unit_ids=unit_ids)


@shared_task(ignore_result=True, max_retries=0)
def units_verify_sweep() -> int:
    """Replicas nobody took, and arbitrations lost, go to the platform (periodic)."""
    return flows.units_verify_sweep()


@shared_task(ignore_result=True, max_retries=0)
def batches_finalize() -> int:
    """Write the output and error files of the OpenAI-compatible batches whose jobs have closed (periodic)."""
    return flows.batches_finalize()


@shared_task(ignore_result=True, max_retries=0)
def batch_files_expire() -> int:
    """Delete the batch files (buyers' inputs and results) whose retention has ended (periodic)."""
    return services.batch_files_expire()


@shared_task(ignore_result=True, max_retries=0)
def jobs_data_expire() -> int:
    """Delete the documents and results of the jobs whose retention has ended (periodic)."""
    return flows.jobs_data_expire()
