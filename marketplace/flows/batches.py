"""An OpenAI-compatible batch's flows: created as one of our jobs (its requests become the job's documents,
its bid and deadline the job's), and cancelled with it. The file format is marketplace.batches; the API
marketplace.openai_api; docs/api.md, "OpenAI-compatible batches", tells buyers the rules."""

import hashlib
import json
import re
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import services as billing
from billing.money import femto_per_minor
from billing.selectors import buyer_balance_minor
from fleet import workloads
from marketplace import batches, selectors, services as market
from marketplace.core.errors import Conflict, NotFound, ValidationFailed
from marketplace.flows.jobs import job_cancel, job_create_from
from marketplace.models import AIModel, Batch, BatchFile, Job, Organisation, User

#: completion_window: a whole number of hours from 1 to 168 ("24h" is OpenAI's only one); it sets the job's deadline.
WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
MAX_WINDOW_HOURS = 168


def completion_window_deadline(window: str) -> timedelta:
    match = WINDOW.match(window or "")
    if not match or int(match[1]) > MAX_WINDOW_HOURS:
        raise ValidationFailed(f"completion_window must be a whole number of hours from 1h to {MAX_WINDOW_HOURS}h "
                               f"(such as 24h), not {window!r}.", code="invalid_completion_window",
                               extra={"param": "completion_window"})
    return timedelta(hours=int(match[1]))


def default_precision(ai_model: AIModel) -> str:
    """A batch's precision when it names none: int8 when its model runs at int8 (every car can, and it is the
    cheapest), else the model's first."""
    return "int8" if "int8" in ai_model.precisions else ai_model.precisions[0]


def default_bid_micros(*, organisation: Organisation, precision: str, mops_total: int) -> int:
    """A batch's bid when it names none: the price the new-job page suggests (the market's last clearing price
    plus marketplace.selectors.SUGGESTED_BID_MARGIN_PCT, or SUGGESTED_BID_FALLBACK_MICROS before any round),
    lowered to what the organisation's balance can reserve for all of the batch's work (at least 1)."""
    suggested = selectors.suggested_bid_micros(precision=precision)
    balance_femto = max(0, buyer_balance_minor(organisation=organisation)) * femto_per_minor(settings.CURRENCY)
    return max(1, min(suggested, balance_femto // max(1, mops_total)))


def _fingerprint(**request) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


def batch_create(*, organisation: Organisation, user: User | None, input_file_id: str, endpoint: str,
                 completion_window: str, metadata: dict | None = None,
                 max_price_per_unit_micros: int | None = None, precision: str | None = None,
                 key_default_per_million_tokens_micros: int | None = None,
                 output_expires_after_s: int | None = None) -> Batch:
    """Create a batch from an uploaded file and run it as a job. Every line is checked
    (marketplace.batches.parse): bad lines go to the error file by number and the rest run; a file with no
    valid request or too many makes a failed batch with no job. The bid (per the endpoint's price unit): the
    request's, else the API key's default (``key_default_per_million_tokens_micros``, for a workload priced per
    token), else :func:`default_bid_micros`. The same request
    again (same file and parameters) within BATCH_REPEAT_WINDOW_S returns the batch it made: the OpenAI
    client sends no Idempotency-Key. The job is created by :func:`marketplace.flows.job_create_from` (its budget reserved: 402
    ``insufficient_balance`` when the balance cannot)."""
    if endpoint not in batches.ENDPOINTS:
        raise ValidationFailed(f"endpoint must be one of {', '.join(batches.ENDPOINTS)}, not {endpoint!r}.",
                               code="unsupported_endpoint", extra={"param": "endpoint"})
    now, window = timezone.now(), completion_window_deadline(completion_window)
    market.batch_file_expiry_check(seconds=output_expires_after_s, param="output_expires_after")
    if max_price_per_unit_micros is not None:
        bid_source = Batch.BidSource.REQUEST
    elif (key_default_per_million_tokens_micros is not None
          and batches.ENDPOINTS[endpoint].price_unit.name == "token"):
        bid_source, max_price_per_unit_micros = Batch.BidSource.API_KEY, key_default_per_million_tokens_micros
    else:
        bid_source = Batch.BidSource.DEFAULT
    file = selectors.batch_files_for(organisation=organisation).defer(None).filter(public_id=input_file_id).first()
    if file is None:
        raise NotFound(f"No file {input_file_id!r}.", code="file_not_found", extra={"param": "input_file_id"})
    if file.purpose != BatchFile.Purpose.BATCH:
        raise ValidationFailed("The input file's purpose must be 'batch'.", code="invalid_input_file",
                               extra={"param": "input_file_id"})
    fingerprint = _fingerprint(file=file.public_id, endpoint=endpoint, window=completion_window, metadata=metadata,
                               price=max_price_per_unit_micros, precision=precision,
                               output_expires_after=output_expires_after_s)
    repeat = settings.BATCH_REPEAT_WINDOW_S
    if earlier := selectors.batch_repeat(organisation=organisation, fingerprint=fingerprint, window_s=repeat):
        return earlier

    models = {m.slug: workloads.ModelInfo.of(m) for m in AIModel.objects.filter(active=True)}
    parsed = batches.parse(bytes(file.content).splitlines(), endpoint=endpoint, models=models,
                           max_text_bytes=settings.MAX_UPLOAD_LINE_BYTES)
    record = dict(organisation=organisation, user=user, input_file=file, endpoint=endpoint,
                  completion_window=completion_window, metadata=metadata, fingerprint=fingerprint, parsed=parsed,
                  created_at=now, output_expires_after_s=output_expires_after_s)
    draft = None
    if not parsed.file_errors:
        ai_model = AIModel.objects.get(slug=parsed.model)
        precision = precision or default_precision(ai_model)
        bid = (ai_model.price_from_buyer(max_price_per_unit_micros)
               if max_price_per_unit_micros is not None else selectors.suggested_bid_micros(precision=precision))
        workload = workloads.get(ai_model.task)
        documents = (json.dumps(workload.input_row(doc_id, text), ensure_ascii=False).encode() + b"\n"
                     for request in parsed.requests
                     for doc_id, text in zip(batches.document_ids(request), request.texts))
        # The slow part (tokenizing every document) holds no transaction, as for any job.
        draft = market.job_prepare(model_slug=ai_model.slug, precision=precision, max_price_micros=max(1, bid),
                                   deadline=now + window, inputs=documents, params=parsed.params)
        if bid_source == Batch.BidSource.DEFAULT:
            draft.max_price_micros = default_bid_micros(organisation=organisation, precision=precision,
                                                        mops_total=draft.mops_total)
    try:
        with transaction.atomic():
            list(BatchFile.objects.select_for_update().filter(pk=file.pk).values_list("pk"))  # one create per file at a time
            if earlier := selectors.batch_repeat(organisation=organisation, fingerprint=fingerprint, window_s=repeat):
                return earlier
            job = job_create_from(organisation=organisation, user=user, draft=draft) if draft else None
            return market.batch_record(**record, job=job, bid_source=bid_source)
    finally:
        if draft is not None:
            draft.units.close()


def batch_cancel(*, batch: Batch, by: User | None = None) -> Batch:
    """Cancel a batch: its job is cancelled (queued work stops, leases are withdrawn, the unused budget goes
    back to the balance), then its files are written with what was finished (the buyer pays only for that)."""
    if batch.job_id is None or batch.job.state not in Job.OPEN_STATES:
        status = selectors.batch_status(batch)
        if status not in ("cancelling", "cancelled"):
            raise Conflict(f"A {status} batch cannot be cancelled.", code="batch_not_cancellable")
    else:
        market.batch_cancelling_mark(batch=batch)
        job_cancel(job=batch.job, by=by)
        batch_finalize(batch_id=batch.pk)
    return Batch.objects.select_related("job__ai_model").get(pk=batch.pk)


def batch_finalize(*, batch_id: int) -> bool:
    """Write a closed batch's files (marketplace.services.batch_files_write), once, and give its buyer back what
    the finished documents of its undelivered requests were charged (a request with a list input can be half
    computed when its batch expires or is cancelled): a batch's buyer pays only for the lines in its output
    file. Returns whether it wrote them now; a batch whose job is still open is left as it is."""
    with transaction.atomic():
        written = market.batch_files_write(batch_id=batch_id)
        if written is None:
            return False
        batch, undelivered_femto = written
        billing.undelivered_credit(job=batch.job, femto=undelivered_femto, reference=f"undelivered:{batch.public_id}",
                                   description=f"Batch {batch.public_id}: finished parts of requests not delivered")
    return True


def batches_finalize(*, organisation: Organisation | None = None) -> int:
    """Finalize every batch whose job has closed (of one organisation, before its batches are listed, or all:
    the periodic ``batches-finalize`` task; reading a batch through the API finalizes it too, so that a client
    polling sees it at once). Returns how many."""
    return sum(batch_finalize(batch_id=pk) for pk in market.batches_to_finalize(organisation=organisation))
