import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

from django.db.models import Count, F, Func, IntegerField, Q, QuerySet, Sum
from django.utils import timezone

from billing.models import Reservation
from billing.money import femto_per_minor, femto_to_minor_ceil
from fleet import workloads
from fleet.models import WorkUnit
from marketplace.models import (AIModel, ApiKey, AuctionRound, Batch, BatchFile, Job, Organisation, WebhookDelivery,
                                WebhookEndpoint)

#: The new-job form suggests a bid this much above the market's last clearing price (docs/examples/submit_job.py
#: bids the same margin by default)...
SUGGESTED_BID_MARGIN_PCT = 25
#: ... or, before any round of the market has cleared, this price per compute unit.
SUGGESTED_BID_FALLBACK_MICROS = 1_000_000


def organisation_of(request) -> Organisation | None:
    """The buyer organisation a request acts for: its API key's, else the signed-in member's."""
    auth = getattr(request, "auth", None)  # only DRF requests carry one
    if isinstance(auth, ApiKey):
        return auth.organisation
    user = request.user
    return user.organisation if user.is_authenticated and user.is_buyer else None


def jobs_for(*, organisation: Organisation, states: list[str] | None = None, model: str | None = None,
             created_after: datetime | None = None, created_before: datetime | None = None) -> QuerySet[Job]:
    """The organisation's jobs, newest first, optionally filtered (the created range is inclusive)."""
    jobs = Job.objects.filter(organisation=organisation).select_related("ai_model")
    if states:
        jobs = jobs.filter(state__in=states)
    if model:
        jobs = jobs.filter(ai_model__slug=model)
    if created_after:
        jobs = jobs.filter(created_at__gte=created_after)
    if created_before:
        jobs = jobs.filter(created_at__lte=created_before)
    return jobs.order_by("-created_at", "-pk")


def default_model(*, task: str = "embedding") -> AIModel | None:
    """The catalogue's default model for a task: the active one with the fewest operations per token (the
    cheapest to run), then by slug."""
    return AIModel.objects.filter(active=True, task=task).order_by("ops_per_token", "slug").first()


def rounds_public(*, market: str | None = None, since: datetime | None = None,
                  traded: bool | None = None) -> QuerySet[AuctionRound]:
    """Cleared rounds, newest first, as anyone may see them: price and aggregate volumes. The journal (every
    bid and offer, by job and car) is never loaded: bids are sealed, before and after the round."""
    rounds = AuctionRound.objects.defer("journal")
    if market:
        rounds = rounds.filter(market=market)
    if since:
        rounds = rounds.filter(cleared_at__gt=since)
    if traded is not None:
        rounds = rounds.filter(clearing_price_micros__isnull=not traded)
    return rounds.order_by("-cleared_at", "-pk")


def api_keys_for(*, organisation: Organisation) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organisation=organisation).order_by("-created_at", "-pk")


def webhook_endpoints_for(*, organisation: Organisation) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(organisation=organisation, disabled_at=None)


def webhook_deliveries_for(*, endpoint: WebhookEndpoint) -> QuerySet[WebhookDelivery]:
    return endpoint.deliveries.select_related("event").order_by("-created_at", "-pk")


def last_clearing_price(*, precision: str) -> int | None:
    return (AuctionRound.objects.filter(market=precision, clearing_price_micros__isnull=False)
            .order_by("-cleared_at").values_list("clearing_price_micros", flat=True).first())


def suggested_bid_micros(*, precision: str) -> int:
    """The bid the new-job form suggests in a market, per compute unit: its last clearing price plus
    SUGGESTED_BID_MARGIN_PCT (rounded down), or SUGGESTED_BID_FALLBACK_MICROS before any round has cleared."""
    price = last_clearing_price(precision=precision)
    return price * (100 + SUGGESTED_BID_MARGIN_PCT) // 100 if price else SUGGESTED_BID_FALLBACK_MICROS


def model_prices(*, ai_model: AIModel) -> dict[str, int | None]:
    """Micro-units per price unit of this model (a million tokens, a thousand pages) at the last clearing price
    of each precision."""
    prices = {}
    for precision in ai_model.precisions:
        price = last_clearing_price(precision=precision)
        prices[precision] = None if price is None else ai_model.price_for_buyer(price)
    return prices


def job_results_lines(*, job: Job) -> Iterator[str]:
    """The job's results as JSON Lines in input order, streamed unit by unit: each document's ``index``, ``id``
    and its workload's result (fleet.workloads.base.Workload.result_row)."""
    workload = workloads.get(job.ai_model.task)
    index = 0
    units = WorkUnit.objects.filter(job=job).order_by("seq").only("seq", "inputs", "result", "state")
    for unit in units.iterator(chunk_size=50):
        for doc, item in zip(unit.inputs, unit.result or [None] * len(unit.inputs)):
            row = {"index": index, "id": doc.get("id")}
            if item is None:
                row["error"] = "not computed"
            else:
                row.update(workload.result_row(item, job.params))
            yield json.dumps(row, separators=(",", ":")) + "\n"
            index += 1


def job_results_summary(*, job: Job) -> list[tuple[str, int]] | None:
    """The job page's summary of the results so far, by its workload (a classifier's label counts), or None."""
    workload = workloads.get(job.ai_model.task)
    if type(workload).summary is workloads.Workload.summary or job.data_deleted_at is not None:
        return None
    results = WorkUnit.objects.filter(job=job, state=WorkUnit.State.DONE).values_list("result", flat=True)
    return workload.summary((item for result in results.iterator(chunk_size=200) for item in result or []),
                            job.params)


def job_results_preview(*, job: Job, pages: int = 3) -> list[dict]:
    """The first ``pages`` documents done, in input order, as the job page shows them beside their result (an
    OCR page's image and text), or [] when its workload shows none."""
    workload = workloads.get(job.ai_model.task)
    if type(workload).preview is workloads.Workload.preview or job.data_deleted_at is not None:
        return []
    shown = []
    for inputs, result in (WorkUnit.objects.filter(job=job, state=WorkUnit.State.DONE).order_by("seq")
                           .values_list("inputs", "result")[:pages]):
        for doc, item in zip(inputs or [], result or []):
            shown.append({"id": doc.get("id"), **workload.preview(doc, item)})
    return shown[:pages]


@dataclass(frozen=True)
class JobProgress:
    """A job's progress from its units (one aggregate query): what the job page and its live block show."""

    units_done: int
    units_total: int
    tokens_done: int
    tokens_total: int
    mops_left: int
    cars_working: int
    mean_price_micros: int | None  # mean clearing price paid per compute unit so far, weighted by work

    @property
    def pct(self) -> int:
        return int(100 * self.units_done / self.units_total) if self.units_total else 0


def job_progress(*, job: Job) -> JobProgress:
    done = Q(state=WorkUnit.State.DONE)
    left = Q(state__in=[WorkUnit.State.QUEUED, WorkUnit.State.LEASED])
    figures = WorkUnit.objects.filter(job=job).aggregate(
        units_done=Count("pk", filter=done), tokens_done=Sum("tokens", filter=done), mops_left=Sum("mops", filter=left),
        cars_working=Count("leased_to", filter=Q(state=WorkUnit.State.LEASED), distinct=True))
    paid = job.meter_records.aggregate(mops=Sum("mops"), femto=Sum("charge_femto"))
    return JobProgress(
        units_done=figures["units_done"], units_total=job.units_total, tokens_done=figures["tokens_done"] or 0,
        tokens_total=job.tokens_total, mops_left=figures["mops_left"] or 0, cars_working=figures["cars_working"],
        mean_price_micros=paid["femto"] // paid["mops"] if paid["mops"] else None)


# What the API and the buyer's webhooks show of a job, in this order (marketplace.api.JobSerializer declares
# the same fields for the schema; tests/marketplace/test_api.py checks that the two agree).
JOB_PUBLIC_FIELDS = ("id", "model", "task", "params", "precision", "state", "max_price_micros", "price_unit", "max_price_per_unit_micros", "max_price_per_million_tokens_micros",
                     "currency", "deadline", "budget_cap_minor", "docs_total", "tokens_total", "mops_total",
                     "units_total", "units_done", "progress_pct", "created_at", "started_at", "finished_at",
                     "data_expires_at", "data_deleted_at")


def _api_datetime(value: datetime | None) -> str | None:
    """A time as the API writes it: ISO 8601 in UTC, with a Z (as DRF's DateTimeField does)."""
    if value is None:
        return None
    text = timezone.localtime(value, timezone.get_current_timezone()).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def job_public(job: Job) -> dict:
    """A job exactly as GET /api/v1/jobs/{id}/ shows it, and as its webhook events carry it."""
    return {
        "id": job.pk, "model": job.ai_model.slug, "task": job.ai_model.task, "params": job.params,
        "precision": job.precision, "state": job.state,
        "max_price_micros": job.max_price_micros,
        "price_unit": job.ai_model.price_unit.label,
        "max_price_per_unit_micros": job.ai_model.price_for_buyer(job.max_price_micros),
        "max_price_per_million_tokens_micros": (job.ai_model.price_for_buyer(job.max_price_micros)
                                                if job.ai_model.price_unit.name == "token" else None),
        "currency": job.currency, "deadline": _api_datetime(job.deadline), "budget_cap_minor": job.budget_cap_minor,
        "docs_total": job.docs_total, "tokens_total": job.tokens_total, "mops_total": job.mops_total,
        "units_total": job.units_total, "units_done": job.units_done, "progress_pct": job.progress_pct,
        "created_at": _api_datetime(job.created_at), "started_at": _api_datetime(job.started_at),
        "finished_at": _api_datetime(job.finished_at),
        "data_expires_at": _api_datetime(job.data_expires_at), "data_deleted_at": _api_datetime(job.data_deleted_at),
    }

def jobs_budget_left_femto(*, job_ids: list[int]) -> dict[int, int]:
    """For each of ``job_ids``: what is left of its reservation (see billing), in femto-units, after what was
    charged and what its leased units will cost at their lease's price; 0 for a job without an active one."""
    reserved = dict(Reservation.objects.filter(job_id__in=job_ids, status=Reservation.Status.ACTIVE)
                    .values_list("job_id", "pk"))
    reservations = Reservation.objects.in_bulk(list(reserved.values()))
    leased = _leased_femto(job_ids=list(reserved))
    left = {pk: 0 for pk in job_ids}
    for job_id, pk in reserved.items():
        r = reservations[pk]
        left[job_id] = (r.amount_minor * femto_per_minor(r.currency) - r.charged_femto - leased.get(job_id, 0))
    return left


def _leased_femto(*, job_ids: list[int]) -> dict[int, int]:
    return dict(WorkUnit.objects.filter(job_id__in=job_ids, state=WorkUnit.State.LEASED).values("job_id").order_by()
                .annotate(femto=Sum(F("mops") * F("price_micros"))).values_list("job_id", "femto"))


def job_reservation_needed_minor(*, job: Job, queued_mops: int | None = None) -> int:
    """What a job must hold reserved, in minor units: its budget cap when it has one, else the cost of all its
    remaining work at its bid; never less than what it has spent and what its leased units will cost."""
    reservation = Reservation.objects.filter(job=job).first()
    committed = (reservation.charged_femto if reservation else 0) + _leased_femto(job_ids=[job.pk]).get(job.pk, 0)
    if job.budget_cap_minor is not None:
        return max(job.budget_cap_minor, femto_to_minor_ceil(femto=committed, currency=job.currency))
    if queued_mops is None:
        queued_mops = job.units.filter(state=WorkUnit.State.QUEUED).aggregate(m=Sum("mops"))["m"] or 0
    return femto_to_minor_ceil(femto=committed + queued_mops * job.max_price_micros, currency=job.currency)


def bid_quantity_mops(*, queued_mops: int, max_price_micros: int, budget_left_femto: int,
                      largest_unit_mops: int) -> int:
    """The mega-ops a job bids for in a round: its queued work, or, when its reservation cannot pay all of it
    at the bid, what the rest of the reservation pays less one unit, since the dispatcher may lease the last
    unit of an allocation whole. So the job never spends beyond the money reserved for it."""
    if queued_mops * max_price_micros <= budget_left_femto:
        return queued_mops
    return max(0, budget_left_femto // max_price_micros - largest_unit_mops)


# --- OpenAI-compatible files and batches (marketplace.openai_api) ---------------------------------------

def _unix(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def batch_files_for(*, organisation: Organisation, purpose: str | None = None) -> QuerySet[BatchFile]:
    """The organisation's files, newest first, without their content; not those whose retention has ended."""
    files = (BatchFile.objects.filter(organisation=organisation).defer("content").order_by("-pk")
             .exclude(expires_at__lt=timezone.now()))  # expired: gone, even before the sweep deletes it
    return files.filter(purpose=purpose) if purpose else files


def batch_file_public(file: BatchFile) -> dict:
    """A file as OpenAI's FileObject."""
    return {"id": file.public_id, "object": "file", "bytes": file.bytes, "created_at": _unix(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": "processed",
            "expires_at": _unix(file.expires_at),
            "status_details": None}


def batches_for(*, organisation: Organisation) -> QuerySet[Batch]:
    return Batch.objects.filter(organisation=organisation).select_related("job__ai_model").order_by("-pk")


def batch_repeat(*, organisation: Organisation, fingerprint: str, window_s: int) -> Batch | None:
    """The batch an identical create request made within the last ``window_s`` seconds, if any."""
    since = timezone.now() - timedelta(seconds=window_s)
    return batches_for(organisation=organisation).filter(fingerprint=fingerprint, created_at__gte=since).first()


BATCH_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                  "cancelled")


def batch_status(batch: Batch) -> str:
    """OpenAI's status from the job's state. Validation runs while the batch is created, so a batch is never
    seen ``validating``; a closed job's batch is ``finalizing`` (``cancelling``) until its files are written."""
    job = batch.job
    if batch.failed_at is not None or job is None:
        return "failed"
    if job.state in Job.OPEN_STATES:
        return "cancelling" if batch.cancelling_at else "in_progress"
    if job.state == Job.State.CANCELLED:
        return "cancelled" if batch.finalized_at else "cancelling"
    if batch.finalized_at is None:
        return "finalizing"
    return "completed" if job.state == Job.State.COMPLETED else "expired"


class _JSONArrayLength(Func):
    """The length of a JSON array column (SQLite's json_array_length, PostgreSQL's jsonb_array_length)."""

    function = "json_array_length"
    output_field = IntegerField()

    def as_postgresql(self, compiler, connection, **extra):
        return super().as_sql(compiler, connection, function="jsonb_array_length", **extra)


def _requests_done(batch: Batch) -> int:
    """How many of an open batch's requests are wholly computed (the units holding their documents all done).
    Units hold up to DOCS_PER_UNIT documents each, fewer where long texts filled one sooner."""
    units = (WorkUnit.objects.filter(job_id=batch.job_id).order_by("seq")
             .annotate(docs=_JSONArrayLength("inputs")).values_list("state", "docs"))
    ends, done = [], []  # per unit: the index one past its last document, and whether it is done
    for state, docs in units:
        ends.append((ends[-1] if ends else 0) + (docs or 0))
        done.append(state == WorkUnit.State.DONE)
    if not any(done):
        return 0
    count, start, unit = 0, 0, 0
    for _, _, docs in batch.requests:
        while unit < len(ends) and ends[unit] <= start:
            unit += 1
        last = unit
        while last < len(ends) and ends[last] < start + docs:
            last += 1
        count += all(done[unit:last + 1]) and last < len(ends)
        start += docs
    return count


def batch_public(batch: Batch) -> dict:
    """A batch as OpenAI's Batch object."""
    status, job = batch_status(batch), batch.job
    finished = job.finished_at if job is not None and job.state not in Job.OPEN_STATES else None
    if batch.finalized_at is not None:
        completed, failed, tokens = batch.request_completed, batch.request_failed, batch.usage_tokens
    else:
        completed, failed = _requests_done(batch), batch.request_failed
        tokens = job_progress(job=job).tokens_done if job is not None else 0
    return {
        "id": batch.public_id, "object": "batch", "endpoint": batch.endpoint, "model": batch.model_slug or None,
        "errors": None if not batch.errors else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_public_id, "completion_window": batch.completion_window, "status": status,
        "output_file_id": batch.output_file_id or None, "error_file_id": batch.error_file_id or None,
        "created_at": _unix(batch.created_at),
        "in_progress_at": None if batch.failed_at else _unix(batch.created_at),
        "expires_at": _unix(job.deadline) if job is not None else None,
        "finalizing_at": _unix(finished) if finished and job.state != Job.State.CANCELLED else None,
        "completed_at": _unix(batch.finalized_at) if status == "completed" else None,
        "failed_at": _unix(batch.failed_at),
        "expired_at": _unix(finished) if status == "expired" else None,
        "cancelling_at": _unix(batch.cancelling_at or (finished if job and job.state == Job.State.CANCELLED else None)),
        "cancelled_at": _unix(batch.finalized_at) if status == "cancelled" else None,
        "request_counts": {"total": batch.request_total, "completed": completed, "failed": failed},
        "usage": {"input_tokens": tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": tokens},
        "metadata": batch.metadata,
        # Ours, beyond OpenAI's object: the job that runs the batch (GET /api/v1/jobs/{id}/), and its bid.
        "job_id": batch.job_id,
        "max_price_micros": job.max_price_micros if job is not None else None, "bid_source": batch.bid_source,
        "precision": job.precision if job is not None else None,
    }


def batch_of_job(*, job: Job, custom_ids: int = 20) -> dict | None:
    """What a job's page shows of the OpenAI-compatible batch it runs, if any: the batch, and the first
    ``custom_ids`` of its requests' custom_ids (with how many more there are)."""
    batch = Batch.objects.filter(job=job).first()
    if batch is None:
        return None
    batch.job = job
    ids = [custom_id for custom_id, _, _ in batch.requests[:custom_ids]]
    return {"batch": batch_public(batch), "bid_source": batch.get_bid_source_display(), "custom_ids": ids,
            "more_custom_ids": max(0, len(batch.requests) - custom_ids), "refused": len(batch.line_errors)}
