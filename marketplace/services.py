"""Everything in the marketplace that writes: organisations and API keys, jobs, auction rounds."""

import json
import logging
import math
import secrets
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import BinaryIO, Iterable, Iterator

from allauth.account.forms import default_token_generator
from allauth.account.utils import user_pk_to_url_str
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import F, Max, Q, Sum
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from billing.models import MeterRecord
from billing.money import mops_for_tokens
from fleet import tokens, workloads
from fleet.models import WorkUnit
from fleet.selectors import vehicle_consents, vehicle_runs, vehicles_offering
from marketplace import batches, buyer_webhooks, clearing, selectors
from marketplace.core.errors import ApplicationError, Conflict, ValidationFailed
from marketplace.errors import AuctionError
from marketplace.models import (AIModel, Allocation, ApiKey, AuctionRound, Batch, BatchFile, Job, JobEvent, Organisation,
                                User)

log = logging.getLogger(__name__)


# --- accounts ------------------------------------------------------------------------------------------

def organisation_create(*, name: str) -> Organisation:
    base = slugify(name)[:40] or "org"
    slug, n = base, 1
    while Organisation.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return Organisation.objects.create(name=name, slug=slug)


@transaction.atomic
def buyer_create(*, email: str, password: str | None = None, organisation_name: str | None = None) -> User:
    """A buyer user with an organisation of their own (named after them unless given)."""
    user = User.objects.create_user(email=email, password=password)
    return user_role_set(user=user, role=User.Role.BUYER, organisation_name=organisation_name)


def api_key_create(*, organisation: Organisation | None, name: str, created_by: User | None = None) -> tuple[ApiKey, str]:
    """Create an API key (an organisation's, or with ``organisation=None`` an owner's own); the secret is
    returned once and only its hash is kept."""
    secret, prefix = tokens.new_token("mk")
    key = ApiKey.objects.create(organisation=organisation, name=name, prefix=prefix, key_hash=tokens.digest(secret),
                                created_by=created_by)
    return key, secret


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])


def api_key_default_bid_set(*, key: ApiKey, per_million_tokens_micros: int | None) -> ApiKey:
    """Set (None: remove) the bid that OpenAI-compatible batches made with ``key`` take when they name none."""
    if per_million_tokens_micros is not None and per_million_tokens_micros <= 0:
        raise ValidationFailed("The default bid must be a positive number of micro-units per million tokens, or none.",
                               extra={"fields": {"default_bid_per_million_tokens_micros": ["Must be positive."]}})
    key.default_bid_per_million_tokens_micros = per_million_tokens_micros
    key.save(update_fields=["default_bid_per_million_tokens_micros"])
    return key


def api_key_authenticate(*, secret: str) -> ApiKey | None:
    prefix = tokens.prefix_of(secret, "mk")
    if prefix is None:
        return None
    key = ApiKey.objects.select_related("organisation").filter(prefix=prefix, revoked_at=None).first()
    if key is None or not tokens.matches(secret, key.key_hash):
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > timedelta(minutes=1):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
    return key


def job_history_add(*, job: Job, kind: str, detail: str = "", by=None) -> JobEvent:
    """One line of a job's history, in the transaction that makes the change it tells of."""
    return JobEvent.objects.create(job=job, kind=kind, detail=detail[:300], by=by)


# --- jobs ----------------------------------------------------------------------------------------------

def _line_limit(workload: workloads.Workload) -> int:
    return workload.max_line_bytes or settings.MAX_UPLOAD_LINE_BYTES


def _parse_line(raw: bytes, number: int, workload: workloads.Workload = workloads.get("embedding")) -> dict | str | None:
    """One JSON Lines row: the workload's document (fleet.workloads.base.Workload.document_clean), an error
    message, or None for a blank line."""
    if len(raw) > _line_limit(workload):
        return f"line is longer than {_line_limit(workload)} bytes"
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "line is not valid UTF-8"
    if not line:
        return None
    try:
        row = json.loads(line)
    except ValueError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    doc_id = row.get("id")
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or len(str(doc_id)) > 256):
        return '"id" must be a string or an integer of at most 256 characters'
    try:
        return workload.document_clean(row)
    except workloads.BadInput as bad:
        return bad.message


def _lines(stream: BinaryIO, limit: int) -> Iterator[bytes]:
    """The lines of a binary file, each read with a bounded ``readline``: memory stays flat whatever the size
    of the file, or of one line. A line over ``limit`` bytes comes out cut at ``limit + 1`` (still too long for
    :func:`_parse_line` to accept, so it is reported by its number) and the rest of it is skipped."""
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass
        yield line


@dataclass
class JobDraft:
    """A job checked and costed but not saved yet. Its units wait in a temporary file, one JSON line each
    (``[tokens, mops, documents]``), so that memory stays flat whatever the size of the inputs."""

    ai_model: AIModel
    precision: str
    max_price_micros: int
    deadline: datetime
    units: BinaryIO
    budget_cap_minor: int | None = None
    params: dict = field(default_factory=dict)  # the workload's, checked (fleet.workloads)
    docs_total: int = 0
    tokens_total: int = 0
    mops_total: int = 0
    units_total: int = 0


# Documents costed per tokenizer call (one call per unit of 8 took 40 % longer), fewer when they are long.
_COST_BATCH_DOCS = 512
_COST_BATCH_BYTES = 1 << 20


def _units_spool(draft: JobDraft, docs: list[dict]) -> None:
    """Cost ``docs`` by their workload and append them to the draft as units, in order: ``DOCS_PER_UNIT``
    documents a unit (or the workload's own number), fewer when their texts would not fit one unit.assign message
    (fleet.protocol.UNIT_TEXT_BYTES), or inputs fetched by URL would exceed the workload's max_unit_bytes.
    A unit's cost is its documents' and the workload's own per unit (a classifier's labels)."""
    workload, model = workloads.get(draft.ai_model.task), workloads.ModelInfo.of(draft.ai_model)
    counts = workload.costs(model, docs)
    overhead = workload.unit_overhead(model, draft.params)
    max_docs, max_bytes = workload.unit_limits(settings.DOCS_PER_UNIT)
    unit_docs, unit_tokens, unit_bytes = [], 0, 0

    def flush() -> None:
        tokens = unit_tokens + overhead
        mops = mops_for_tokens(tokens=tokens, ops_per_token=draft.ai_model.ops_per_token)
        draft.units.write(json.dumps([tokens, mops, unit_docs], separators=(",", ":")).encode() + b"\n")
        draft.units_total += 1
        draft.docs_total += len(unit_docs)
        draft.tokens_total += tokens
        draft.mops_total += mops

    for doc, tokens in zip(docs, counts):
        size = workload.payload_bytes(doc)
        if unit_docs and (len(unit_docs) == max_docs or unit_bytes + size > max_bytes):
            flush()
            unit_docs, unit_tokens, unit_bytes = [], 0, 0
        unit_docs.append(doc)
        unit_tokens += tokens
        unit_bytes += size
    if unit_docs:
        flush()


def job_prepare(*, model_slug: str, precision: str, max_price_micros: int, deadline: datetime,
                inputs: BinaryIO | Iterable[bytes], budget_cap_minor: int | None = None,
                params: dict | None = None) -> JobDraft:
    """Check a job and read its JSON Lines inputs (a binary file, such as an upload, or an iterable of lines),
    streamed: every line is checked, bad lines are reported by number (and then nothing is kept), good ones
    are costed and split into units of ``DOCS_PER_UNIT`` in input order.

    Writes nothing: the slow part of creating a job (reading and tokenizing) holds no transaction, which on
    SQLite would hold the one write lock, and the cars' results with it."""
    errors: dict[str, list[str]] = {}
    ai_model = AIModel.objects.filter(slug=model_slug, active=True).first()
    if ai_model is None:
        errors["model"] = [f"Unknown model {model_slug!r}. See GET /api/v1/models/."]
    elif precision not in ai_model.precisions:
        errors["precision"] = [f"{ai_model.name} runs at {', '.join(ai_model.precisions)}, not {precision!r}."]
    if max_price_micros <= 0:
        errors["max_price_micros"] = ["The maximum price must be a positive number of micro-units."]
    if deadline <= timezone.now():
        errors["deadline"] = ["The deadline must be in the future."]
    if budget_cap_minor is not None and budget_cap_minor <= 0:
        errors["budget_cap_minor"] = ["The budget cap must be a positive amount of minor units (cents), or absent."]
    workload = workloads.get(ai_model.task) if ai_model is not None else None
    if workload is not None:
        try:
            params = workload.params_clean(params, workloads.ModelInfo.of(ai_model))
        except workloads.BadInput as bad:
            errors["params"] = [f"{bad.param}: {bad.message}" if bad.param else bad.message]
        else:
            if len(json.dumps(params)) > workload.max_params_bytes:
                errors["params"] = [f"The parameters may take at most {workload.max_params_bytes} bytes as JSON."]
    if errors:
        raise ValidationFailed("The job is not valid.", extra={"fields": errors})

    draft = JobDraft(ai_model=ai_model, precision=precision, max_price_micros=max_price_micros, deadline=deadline,
                     units=tempfile.TemporaryFile(), budget_cap_minor=budget_cap_minor, params=params)
    bad_lines: list[dict] = []
    bad_count = 0
    pending: list[dict] = []
    pending_bytes = 0
    lines = _lines(inputs, _line_limit(workload)) if hasattr(inputs, "readline") else inputs
    unit_docs = workload.unit_limits(settings.DOCS_PER_UNIT)[0]
    for number, raw in enumerate(lines, start=1):
        parsed = _parse_line(raw, number, workload)
        if isinstance(parsed, str):
            bad_count += 1
            if len(bad_lines) < settings.MAX_ERRORS_REPORTED:
                bad_lines.append({"line": number, "message": parsed})
            continue
        if parsed is None or bad_count:
            continue  # after the first bad line, only validate
        pending.append(parsed)
        pending_bytes += len(raw)
        whole_units = len(pending) % unit_docs == 0
        if whole_units and (len(pending) >= _COST_BATCH_DOCS or pending_bytes >= _COST_BATCH_BYTES):
            _units_spool(draft, pending)
            pending, pending_bytes = [], 0
    if pending and not bad_count:
        _units_spool(draft, pending)
    if bad_count or draft.docs_total == 0:
        draft.units.close()
    if bad_count:
        raise ValidationFailed(f"{bad_count} line(s) of the inputs file are not valid; nothing was created.",
                               code="invalid_inputs", extra={"lines": bad_lines, "bad_line_count": bad_count})
    if draft.docs_total == 0:
        raise ValidationFailed("The inputs file holds no documents.", code="invalid_inputs", extra={"lines": []})
    draft.units.seek(0)
    return draft


def draft_units(draft: JobDraft) -> Iterator[tuple[int, int, list[dict]]]:
    """The units of a prepared job, in order: (tokens, mega-ops, documents) each."""
    for line in draft.units:
        tokens, mops, docs = json.loads(line)
        yield tokens, mops, docs


def job_record(*, organisation: Organisation, user: User | None, draft: JobDraft) -> Job:
    """Save a prepared job's row and its history's first line (its units and reservation: marketplace.flows)."""
    job = Job.objects.create(
        organisation=organisation, created_by=user, ai_model=draft.ai_model, precision=draft.precision,
        max_price_micros=draft.max_price_micros, deadline=draft.deadline, currency=settings.CURRENCY,
        params=draft.params, budget_cap_minor=draft.budget_cap_minor, docs_total=draft.docs_total, tokens_total=draft.tokens_total,
        mops_total=draft.mops_total, units_total=draft.units_total)
    budget = "" if draft.budget_cap_minor is None else f", budget cap {draft.budget_cap_minor} minor units"
    job_history_add(job=job, kind=JobEvent.Kind.CREATED, by=user,
                    detail=f"{draft.docs_total} documents in {draft.units_total} units, bid "
                           f"{draft.max_price_micros} µ$/PetaOp{budget}")
    return job


def job_start(*, job_id: int) -> None:
    """A queued job's first units were leased: it is running from now (once). Its history names no car: a
    buyer never learns which cars worked for them."""
    with transaction.atomic():
        if Job.objects.filter(pk=job_id, state=Job.State.QUEUED).update(state=Job.State.RUNNING,
                                                                        started_at=timezone.now()):
            job_history_add(job=Job(pk=job_id), kind=JobEvent.Kind.STARTED, detail="first units leased")


def job_unit_done(*, job: Job) -> bool:
    """Count one more finished unit of ``job`` (its row locked by the caller) and tell the buyer (an outbox
    event committed with the change); the last one completes it. Returns whether the job is now complete."""
    now = timezone.now()
    job.units_done += 1
    fields = ["units_done"]
    if job.units_done == job.units_total:
        job.state, job.finished_at, job.data_expires_at = Job.State.COMPLETED, now, job_data_expiry(job=job, now=now)
        fields += ["state", "finished_at", "data_expires_at"]
        job_history_add(job=job, kind=JobEvent.Kind.COMPLETED, detail=f"{job.units_total} units done")
    job.save(update_fields=fields)
    buyer_webhooks.job_event_record(job=job)  # job.progress or job.completed
    return job.state == Job.State.COMPLETED


def job_unit_undone(*, job: Job) -> None:
    """A finished unit of an open ``job`` (its row locked by the caller) must be computed again: its result
    was voided (marketplace.flows.vehicle_caught)."""
    job.units_done = max(0, job.units_done - 1)
    job.save(update_fields=["units_done"])


_CLOSE_EVENTS = {Job.State.CANCELLED: JobEvent.Kind.CANCELLED, Job.State.EXPIRED: JobEvent.Kind.EXPIRED}


def job_close(*, job: Job, state: str, reason: str, by: User | None = None) -> None:
    """Mark an open job (its row locked by the caller) cancelled or expired, in its history and to the buyer."""
    job.state, job.finished_at = state, timezone.now()
    job.data_expires_at = job_data_expiry(job=job, now=job.finished_at)
    job.save(update_fields=["state", "finished_at", "data_expires_at"])
    job_history_add(job=job, kind=_CLOSE_EVENTS[state], detail=reason.replace("_", " "), by=by)
    buyer_webhooks.job_event_record(job=job)


# --- a job's data: retention and deletion (docs/api.md, "Data retention and deletion") --------------------

class JobDataDeleted(ApplicationError):
    code = "job_data_deleted"
    status = 410


def job_data_retention_s(*, job: Job) -> int:
    """How long after it finishes a job keeps its documents and results: its own retention (a batch's
    ``output_expires_after``), else BATCH_FILE_RETENTION_S, the one default for buyers' files and jobs."""
    return job.data_retention_s or settings.BATCH_FILE_RETENTION_S


def job_data_expiry(*, job: Job, now: datetime) -> datetime:
    """When the data of a job finishing ``now`` is deleted (the jobs-data-expire sweep)."""
    return now + timedelta(seconds=job_data_retention_s(job=job))


def job_data_check(*, job: Job) -> None:
    """410 ``job_data_deleted`` when the job's documents and results were deleted."""
    if job.data_deleted_at is not None:
        raise JobDataDeleted(f"The data of job {job.pk} was deleted on {job.data_deleted_at:%Y-%m-%d %H:%M} UTC: its "
                             f"documents and results are gone. Its counts and charges stay.",
                             extra={"data_deleted_at": job.data_deleted_at.isoformat()})


def job_data_wipe(*, job: Job, by: User | None = None) -> bool:
    """Delete what the marketplace holds of a closed job's data (its row locked by the caller; its units are
    wiped by fleet.services.units_data_wipe in the same flow, marketplace.flows.job_data_delete): the input,
    output and error files of the batch it runs, and the batch's copy of the requests (custom_ids and line
    errors; its counts stay). The job row, its history, counts and charges stay. Returns False if already done."""
    if job.data_deleted_at is not None:
        return False
    now = timezone.now()
    batch = Batch.objects.select_for_update().filter(job=job).first()
    if batch is not None:
        outputs = [public_id for public_id in (batch.output_file_id, batch.error_file_id) if public_id]
        (BatchFile.objects.filter(organisation_id=job.organisation_id)
         .filter(Q(public_id__in=outputs) | Q(pk=batch.input_file_id)).delete())
        batch.requests, batch.request_options, batch.line_errors = [], [], []
        batch.finalized_at = batch.finalized_at or now  # nothing is left to write its files from
        batch.save(update_fields=["requests", "request_options", "line_errors", "finalized_at"])
    job.data_deleted_at = now
    job.save(update_fields=["data_deleted_at"])
    job_history_add(job=job, kind=JobEvent.Kind.DATA_DELETED, by=by,
                    detail="documents and results deleted" + ("" if by else ": its retention ended"))
    log.info("job %s: data deleted", job.pk)
    return True


def jobs_data_expired(*, now: datetime | None = None) -> list[int]:
    """The closed jobs whose data retention has ended and whose data is not deleted yet."""
    return list(Job.objects.filter(data_deleted_at=None, data_expires_at__lt=now or timezone.now())
                .exclude(state__in=Job.OPEN_STATES).order_by("pk").values_list("pk", flat=True))


def jobs_overdue() -> list[int]:
    """The open jobs whose deadline has passed."""
    return list(Job.objects.filter(state__in=Job.OPEN_STATES, deadline__lt=timezone.now()).values_list("pk", flat=True))


def job_open_check(*, job: Job, what: str) -> None:
    """409 ``job_closed`` unless the job is still open (its ``what`` can no longer change)."""
    if job.state not in Job.OPEN_STATES:
        raise Conflict(f"The job is {job.state}: only a queued or running job's {what} can change.", code="job_closed")


def job_bid_check(*, max_price_micros: int) -> None:
    if max_price_micros <= 0:
        problem = "The maximum price must be a positive number of micro-units."
        raise ValidationFailed("The bid is not valid.", extra={"fields": {"max_price_micros": [problem]}})


def job_budget_check(*, budget_cap_minor: int | None) -> None:
    if budget_cap_minor is not None and budget_cap_minor <= 0:
        problem = "The budget cap must be a positive amount of minor units (cents), or null for none."
        raise ValidationFailed("The budget is not valid.", extra={"fields": {"budget_cap_minor": [problem]}})


def job_bid_set(*, job: Job, max_price_micros: int, by: User | None = None) -> int:
    """Change an open job's sealed bid (its row locked by the caller); returns the previous one. Lowering it
    also gives up the capacity the job won in rounds that cleared above the new bid, so that no work is leased
    to it from now on at a price over its bid. Units already leased keep the price they were leased at."""
    job_open_check(job=job, what="bid")
    previous, job.max_price_micros = job.max_price_micros, max_price_micros
    job.save(update_fields=["max_price_micros"])
    job_history_add(job=job, kind=JobEvent.Kind.BID_CHANGED, by=by,
                    detail=f"from {previous} to {max_price_micros} µ$/PetaOp")
    if max_price_micros < previous:
        (Allocation.objects.filter(job=job, price_micros__gt=max_price_micros, remaining_mops__gt=0)
         .update(remaining_mops=0))
    log.info("job %s: bid changed from %s to %s micros", job.pk, previous, max_price_micros)
    return previous


def job_budget_set(*, job: Job, budget_cap_minor: int | None, by: User | None = None) -> None:
    """Set, change or remove (None) an open job's budget cap (its row locked by the caller)."""
    job_open_check(job=job, what="budget")
    previous, job.budget_cap_minor = job.budget_cap_minor, budget_cap_minor
    job.save(update_fields=["budget_cap_minor"])
    job_history_add(job=job, kind=JobEvent.Kind.BUDGET_CHANGED, by=by,
                    detail=f"from {'none' if previous is None else previous} to "
                           f"{'none' if budget_cap_minor is None else budget_cap_minor} minor units")


def job_budget_reached(*, job_id: int) -> None:
    """Note once in the job's history that its reserved budget stopped its bidding (the auction calls it)."""
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job_id)
        last = job.events.filter(kind__in=[JobEvent.Kind.BUDGET_REACHED, JobEvent.Kind.BUDGET_CHANGED]).last()
        if last is None or last.kind != JobEvent.Kind.BUDGET_REACHED:
            job_history_add(job=job, kind=JobEvent.Kind.BUDGET_REACHED,
                            detail="the reserved budget cannot pay another unit at the bid")


def allocation_draw(*, allocation_id: int, mops: int) -> None:
    """A car was leased ``mops`` of the capacity it won for a job (the car's row lock serialises its use)."""
    Allocation.objects.filter(pk=allocation_id).update(remaining_mops=F("remaining_mops") - mops)


# --- auction -------------------------------------------------------------------------------------------

def auction_clear() -> list[AuctionRound]:
    """Clear every market that has demand, jointly (the tick, marketplace.flows.auction_tick, first closes
    overdue jobs).

    A car that runs several precisions offers each of them what its whole interval would give there; the
    clearing (marketplace.clearing) sells each of its seconds once, to the market where surplus is highest.
    One round is recorded per market, all with the same ``cleared_at``: they replay together."""
    now = timezone.now()
    interval = settings.AUCTION_INTERVAL_S
    queued = Q(units__state=WorkUnit.State.QUEUED)
    jobs = list(Job.objects.filter(state__in=Job.OPEN_STATES).select_related("ai_model")
                .annotate(queued_mops=Sum("units__mops", filter=queued), largest_unit_mops=Max("units__mops", filter=queued))
                .filter(queued_mops__gt=0).order_by("pk"))
    # A job bids only for what the rest of its reservation pays at its bid.
    budget_left = selectors.jobs_budget_left_femto(job_ids=[job.pk for job in jobs])
    for job in jobs:
        job.bid_mops = selectors.bid_quantity_mops(queued_mops=job.queued_mops, max_price_micros=job.max_price_micros,
                                                   budget_left_femto=budget_left[job.pk],
                                                   largest_unit_mops=job.largest_unit_mops)
        if not job.bid_mops:
            job_budget_reached(job_id=job.pk)
    jobs = [job for job in jobs if job.bid_mops]
    if not jobs:
        return []
    top: dict[str, int] = {}
    for job in jobs:
        top[job.precision] = max(top.get(job.precision, 0), job.max_price_micros)
    markets = sorted(top, key=lambda market: (-top[market], market))  # the best-paying market first
    vehicles, capacity = {}, defaultdict(dict)
    for market in markets:
        for vehicle, rate, time_left in vehicles_offering(precision=market, now=now):
            vehicles.setdefault(vehicle.pk, vehicle)
            parked = interval if time_left is None else min(interval, time_left)  # a car sells only time it will be parked
            capacity[vehicle.pk][market] = int(rate * parked)
    bids = [clearing.Bid(id=job.pk, market=job.precision, price=job.max_price_micros, quantity=job.bid_mops)
            for job in jobs]
    offers = [clearing.Offer(id=pk, price=vehicles[pk].policy.reserve_price_micros, capacity=capacity[pk])
              for pk in sorted(capacity)]
    refused = [[job.pk, offer.id] for job in jobs for offer in offers if job.precision in offer.capacity
               and (not vehicle_runs(vehicle=vehicles[offer.id], ai_model=job.ai_model)
                    or not vehicle_consents(vehicle=vehicles[offer.id], job_category=job.ai_model.task,
                                            organisation_id=job.organisation_id))]
    outcome = clearing.clear(bids, offers, refused)
    return _rounds_record(now=now, interval=interval, markets=markets, bids=bids, offers=offers, refused=refused,
                          outcome=outcome)


@transaction.atomic
def _rounds_record(*, now: datetime, interval: float, markets: list[str], bids: list[clearing.Bid],
                   offers: list[clearing.Offer], refused: list[list[int]],
                   outcome: clearing.Outcome) -> list[AuctionRound]:
    """One AuctionRound per market, journalling that market's sealed bids, the offers into it (the mega-ops a
    car's whole interval gives there), the refusals and fills that concern it, and its price; and one
    Allocation per (job, car) with whole mega-ops (a fraction of a mega-op left by a car's split of its
    interval is not sold)."""
    market_of = {bid.id: bid.market for bid in bids}
    sold: dict[tuple[int, int], float] = defaultdict(float)
    for fill in outcome.fills:
        sold[(fill.bid_id, fill.offer_id)] += fill.quantity
    rounds = []
    for market in markets:
        price = outcome.prices[market]
        into = [offer for offer in offers if market in offer.capacity]
        allocations = {pair: math.floor(mops + 1e-9 * mops)
                       for pair, mops in sold.items() if market_of[pair[0]] == market}
        auction_round = AuctionRound.objects.create(
            market=market, cleared_at=now, interval_s=interval, clearing_price_micros=price,
            offered_mops=sum(offer.capacity[market] for offer in into),
            demanded_mops=sum(bid.quantity for bid in bids if bid.market == market),
            sold_mops=sum(allocations.values()),
            journal={
                "markets": markets,
                "bids": [{"id": bid.id, "price": bid.price, "quantity": bid.quantity}
                         for bid in bids if bid.market == market],
                "offers": [{"id": offer.id, "price": offer.price, "quantity": offer.capacity[market]}
                           for offer in into],
                "refused": [pair for pair in refused if market_of[pair[0]] == market],
                "fills": [asdict(fill) for fill in outcome.fills if market_of[fill.bid_id] == market],
                "price": price,
                "dual": outcome.duals[market],
            },
        )
        Allocation.objects.bulk_create(
            Allocation(round=auction_round, job_id=job_id, vehicle_id=vehicle_id, price_micros=price, mops=mops,
                       remaining_mops=mops)
            for (job_id, vehicle_id), mops in allocations.items() if mops > 0
        )
        rounds.append(auction_round)
    return rounds


def round_replay(*, auction_round: AuctionRound) -> clearing.Outcome:
    """Clear a recorded tick again from its journals: the rounds of every market cleared at the same instant
    hold the bids, the offers (a car's quantity in each market it offered to) and the refusals that cleared
    together. Compare the result's price and fills for ``auction_round.market`` with its journal."""
    rounds = list(AuctionRound.objects.filter(cleared_at=auction_round.cleared_at))
    missing = set(auction_round.journal["markets"]) - {r.market for r in rounds}
    if missing:
        raise AuctionError(f"The rounds of {', '.join(sorted(missing))} cleared with this one are gone.",
                           code="journal_incomplete")
    bids, refused = [], []
    reserve, capacity = {}, defaultdict(dict)
    for r in rounds:
        bids += [clearing.Bid(id=b["id"], market=r.market, price=b["price"], quantity=b["quantity"])
                 for b in r.journal["bids"]]
        for offer in r.journal["offers"]:
            reserve[offer["id"]] = offer["price"]
            capacity[offer["id"]][r.market] = offer["quantity"]
        refused += r.journal["refused"]
    offers = [clearing.Offer(id=pk, price=reserve[pk], capacity=capacity[pk]) for pk in sorted(capacity)]
    return clearing.clear(bids, offers, [tuple(pair) for pair in refused])


@transaction.atomic
def user_role_set(*, user: User, role: str, organisation_name: str | None = None) -> User:
    """Give a newly signed-up user their role; a buyer gets a new organisation."""
    user.role = role
    fields = ["role"]
    if role == User.Role.BUYER and user.organisation_id is None:
        user.organisation = organisation_create(name=organisation_name or user.email.split("@")[0])
        fields.append("organisation")
    user.save(update_fields=fields)
    return user


@transaction.atomic
def organisation_member_add(*, organisation: Organisation, email: str, added_by: User, base_url: str) -> User:
    """Add a colleague to a buyer organisation: a new account on ``email`` without a password, and an email
    (sent on commit) with a link to set one. An address that already has an account is refused: an account
    acts for one organisation, or owns cars."""
    email = User.objects.normalize_email(email).lower()
    if User.objects.filter(email__iexact=email).exists():
        raise Conflict(f"{email} already has an account; an account acts for one organisation only.",
                       code="member_exists", extra={"fields": {"email": ["This address already has an account."]}})
    member = User.objects.create_user(email=email, password=None, role=User.Role.BUYER, organisation=organisation)
    link = base_url.rstrip("/") + reverse("account_reset_password_from_key", kwargs={
        "uidb36": user_pk_to_url_str(member), "key": default_token_generator.make_token(member)})
    subject = f"{added_by.email} added you to {organisation.name} on Fleet Compute"
    body = (f"{added_by.email} added you to {organisation.name}, a buyer organisation on Fleet Compute.\n\n"
            f"Set your password to sign in:\n{link}\n\nThe link works once. If you did not expect this, ignore it.")
    transaction.on_commit(lambda: send_mail(subject, body, None, [email]))
    log.info("member %s added to organisation %s by %s", member.pk, organisation.pk, added_by.pk)
    return member


@transaction.atomic
def organisation_member_remove(*, organisation: Organisation, member: User, removed_by: User) -> None:
    """Take a member out of the organisation and close their account (their jobs and keys stay the
    organisation's). The last member cannot leave: someone must be able to act for the jobs."""
    members = User.objects.select_for_update().filter(organisation=organisation, is_active=True)
    if member.organisation_id != organisation.pk:
        raise ValidationFailed("That person is not a member of this organisation.", code="not_a_member")
    if members.count() <= 1:
        raise Conflict("The last member cannot be removed: add a colleague first.", code="last_member")
    member.organisation, member.is_active = None, False
    member.save(update_fields=["organisation", "is_active"])
    log.info("member %s removed from organisation %s by %s", member.pk, organisation.pk, removed_by.pk)


def catalogue_sync() -> None:
    """Make the model catalogue list every model of every workload (fleet.workloads: the catalogue is their
    data). Runs after every migrate; an operator's changes to description and ``active`` are kept."""
    for workload in workloads.WORKLOADS.values():
        for entry in workload.catalogue:
            facts = {"name": entry.name, "task": workload.task, "runtime": entry.runtime,
                     "precisions": list(entry.precisions), "dims": entry.dims, "max_tokens": entry.max_tokens,
                     "ops_per_token": entry.ops_per_unit, "licence": entry.licence, "size_bytes": entry.size_bytes}
            AIModel.objects.update_or_create(slug=entry.slug, defaults=facts,
                                             create_defaults={**facts, "description": entry.description})


# --- OpenAI-compatible files and batches (docs/api.md; the format: marketplace.batches) -----------------

class FileTooLarge(ApplicationError):
    code = "file_too_large"
    status = 413


def _public_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def batch_file_expiry_check(*, seconds: int | None, param: str) -> None:
    """OpenAI's rule for ``expires_after`` and ``output_expires_after``: 1 hour to 30 days after creation."""
    if seconds is not None and not 3600 <= seconds <= 30 * 24 * 3600:
        raise ValidationFailed(f"{param} seconds must be from 3600 (1 hour) to 2592000 (30 days).",
                               code="invalid_value", extra={"param": param})


def batch_file_create(*, organisation: Organisation, user: User | None, upload: BinaryIO, filename: str,
                      purpose: str, expires_after_s: int | None = None) -> BatchFile:
    """Keep an uploaded file of batch requests (checked when a batch is created from it, not now), until it
    expires: ``expires_after_s`` seconds from now, or BATCH_FILE_RETENTION_S."""
    batch_file_expiry_check(seconds=expires_after_s, param="expires_after")
    if purpose != BatchFile.Purpose.BATCH:
        raise ValidationFailed(f"purpose must be 'batch', not {purpose!r}: only batch files are accepted.",
                               code="invalid_purpose", extra={"param": "purpose"})
    content = upload.read(batches.MAX_FILE_BYTES + 1)
    if len(content) > batches.MAX_FILE_BYTES:
        raise FileTooLarge(f"A batch file may hold at most {batches.MAX_FILE_BYTES} bytes.", extra={"param": "file"})
    now = timezone.now()
    return BatchFile.objects.create(public_id=_public_id("file-"), organisation=organisation, created_by=user,
                                    purpose=purpose, filename=(filename or "upload.jsonl")[:255], bytes=len(content),
                                    content=content, created_at=now,
                                    expires_at=now + timedelta(seconds=expires_after_s or settings.BATCH_FILE_RETENTION_S))


def batch_file_delete(*, file: BatchFile) -> None:
    """Delete a file and its content. A batch made from it keeps running and keeps showing its id, as OpenAI's
    do: its job holds its own copy of the documents until the job's retention ends or its data is deleted
    (marketplace.flows.job_data_delete; docs/api.md, "Data retention and deletion")."""
    file.delete()


def _batch_file_write(*, batch: Batch, kind: str, content: bytes) -> str:
    now = timezone.now()
    keep = timedelta(seconds=batch.output_expires_after_s or settings.BATCH_FILE_RETENTION_S)
    file = BatchFile.objects.create(public_id=_public_id("file-"), organisation_id=batch.organisation_id,
                                    purpose=BatchFile.Purpose.BATCH_OUTPUT, filename=f"{batch.public_id}_{kind}.jsonl",
                                    bytes=len(content), content=content, created_by=batch.created_by, created_at=now,
                                    expires_at=now + keep)
    return file.public_id


def _line_errors_jsonl(batch: Batch, extra: Iterable[dict] = ()) -> bytes:
    rows = [batches.error_line(batch_id=batch.public_id, line=e["line"], custom_id=e["custom_id"], code=e["code"],
                               message=e["message"]) for e in batch.line_errors]
    return batches.jsonl([*rows, *extra])


@transaction.atomic
def batch_record(*, organisation: Organisation, user: User | None, input_file: BatchFile, endpoint: str,
                 completion_window: str, metadata: dict | None, fingerprint: str, parsed: batches.ParsedFile,
                 job: Job | None, bid_source: str = Batch.BidSource.REQUEST,
                 created_at: datetime | None = None, output_expires_after_s: int | None = None) -> Batch:
    """Save a batch: one run as ``job`` (marketplace.flows.batch_create), or, when its file failed as a whole
    (``parsed.file_errors``, no job), a failed one with its error file written at once."""
    batch = Batch(
        public_id=_public_id("batch_"), organisation=organisation, job=job, input_file=input_file,
        input_file_public_id=input_file.public_id, endpoint=endpoint, completion_window=completion_window,
        metadata=metadata, fingerprint=fingerprint, model_slug=parsed.model or "", created_by=user,
        bid_source=bid_source, created_at=created_at or timezone.now(), output_expires_after_s=output_expires_after_s,
        requests=[[r.custom_id, r.line, len(r.texts)] for r in parsed.requests],
        request_options=[r.options for r in parsed.requests],
        line_errors=[{"line": e.line, "custom_id": e.custom_id, "code": e.code, "message": e.message}
                     for e in parsed.errors],
        request_total=parsed.total, request_failed=len(parsed.errors))
    if job is None:
        now = timezone.now()
        batch.failed_at = batch.finalized_at = now
        batch.errors = [{"code": e.code, "message": e.message, "param": e.param, "line": e.line or None}
                        for e in (parsed.file_errors + parsed.errors)[:batches.MAX_ERRORS_LISTED]]
        batch.request_failed = batch.request_total
    batch.save()
    if job is not None and output_expires_after_s is not None:  # the job's data is kept as long as its files
        job.data_retention_s = output_expires_after_s
        job.save(update_fields=["data_retention_s"])
    if job is None and batch.line_errors:
        batch.error_file_id = _batch_file_write(batch=batch, kind="error", content=_line_errors_jsonl(batch))
        batch.save(update_fields=["error_file_id"])
    if job is None:
        buyer_webhooks.batch_event_record(batch=batch)  # batch.failed
    return batch


def batch_cancelling_mark(*, batch: Batch) -> None:
    if batch.cancelling_at is None:
        batch.cancelling_at = timezone.now()
        batch.save(update_fields=["cancelling_at"])


def _batch_documents(job: Job) -> Iterator[tuple[object | None, int, int]]:
    """Every document of a job in input order: (its result item, or None when it was not computed, its cost in
    its workload's units, what the buyer was charged for it in femto-units: its share by cost of its unit's
    charge). Only a finished unit's result is delivered."""
    workload, model = workloads.get(job.ai_model.task), workloads.ModelInfo.of(job.ai_model)
    charged = dict(MeterRecord.objects.filter(job=job, role=MeterRecord.Role.BUYER, clawback=None)
                   .values("unit_id").annotate(femto=Sum("charge_femto")).values_list("unit_id", "femto"))
    units = WorkUnit.objects.filter(job=job).order_by("seq").only("seq", "inputs", "result", "state")
    for unit in units.iterator(chunk_size=50):
        done = unit.state == WorkUnit.State.DONE and unit.result
        costs = workload.costs(model, unit.inputs) if done else [0] * len(unit.inputs)
        charge, total = charged.get(unit.pk, 0), sum(costs) or 1
        for k in range(len(unit.inputs)):
            yield (unit.result[k] if done else None), costs[k], charge * costs[k] // total


_UNDONE = {Job.State.EXPIRED: ("batch_expired", "The request was not computed before the batch's completion "
                                                "window ended."),
           Job.State.CANCELLED: ("batch_cancelled", "The request was not computed before the batch was cancelled.")}


@dataclass
class _BatchLines:
    output: list[dict]
    undone: list[dict]
    tokens: int  # delivered
    undelivered_femto: int  # charged for finished documents of requests not delivered


def _batch_lines(*, batch: Batch, job: Job) -> _BatchLines:
    """A closed batch's output lines (the requests all of whose documents were computed, in input order) and
    the error lines of the others, from its job's units as they are now."""
    workload = workloads.get(job.ai_model.task)
    documents = _batch_documents(job)
    lines = _BatchLines(output=[], undone=[], tokens=0, undelivered_femto=0)
    for (custom_id, line, count), options in zip(batch.requests, batch.request_options):
        docs = [next(documents) for _ in range(count)]
        if all(item is not None for item, _, _ in docs):
            tokens = sum(t for _, t, _ in docs)
            lines.tokens += tokens
            body = workload.batch_response([item for item, _, _ in docs], options=options, params=job.params,
                                           model=batch.model_slug, usage=tokens)
            lines.output.append(batches.output_line(batch_id=batch.public_id, line=line, custom_id=custom_id,
                                                    body=body))
        else:
            lines.undelivered_femto += sum(femto for _, _, femto in docs)
            code, message = _UNDONE.get(job.state, ("not_computed", "The request was not computed."))
            lines.undone.append(batches.error_line(batch_id=batch.public_id, line=line, custom_id=custom_id,
                                                   code=code, message=message))
    return lines


def batch_files_write(*, batch_id: int) -> tuple[Batch, int] | None:
    """Write a finished batch's output file (the delivered requests, in input order) and error file (the lines
    refused at validation, then the requests not computed when its job expired or was cancelled), once, and
    record its webhook. Returns the batch and what its buyer was charged for the finished documents of
    undelivered requests (femto-units; marketplace.flows.batch_finalize gives it back), or None when it was
    written before or its job is still open. Call it in a transaction: the batch row is locked."""
    batch = Batch.objects.select_for_update().get(pk=batch_id)
    job = Job.objects.select_related("ai_model", "organisation").filter(pk=batch.job_id).first()
    if batch.finalized_at is not None or job is None or job.state in Job.OPEN_STATES:
        return None
    lines = _batch_lines(batch=batch, job=job)
    if lines.output:
        batch.output_file_id = _batch_file_write(batch=batch, kind="output", content=batches.jsonl(lines.output))
    if lines.undone or batch.line_errors:
        batch.error_file_id = _batch_file_write(batch=batch, kind="error",
                                                content=_line_errors_jsonl(batch, lines.undone))
    batch.request_completed, batch.request_failed = len(lines.output), len(batch.line_errors) + len(lines.undone)
    batch.usage_tokens, batch.finalized_at = lines.tokens, timezone.now()
    batch.save(update_fields=["output_file_id", "error_file_id", "request_completed", "request_failed",
                              "usage_tokens", "finalized_at"])
    batch.job = job
    buyer_webhooks.batch_event_record(batch=batch)  # batch.completed, batch.expired or batch.cancelled
    log.info("batch %s finalized: %s delivered, %s failed", batch.public_id, len(lines.output), batch.request_failed)
    return batch, lines.undelivered_femto


def batches_to_finalize(*, organisation: Organisation | None = None) -> list[int]:
    """The batches whose job has closed and whose files are not written yet (of one organisation, or all)."""
    pending = Batch.objects.filter(finalized_at=None, job__isnull=False).exclude(job__state__in=Job.OPEN_STATES)
    if organisation is not None:
        pending = pending.filter(organisation=organisation)
    return list(pending.values_list("pk", flat=True))


def batch_output_rewrite(*, job_id: int) -> bool:
    """Rewrite a finalized batch's output file after rows of its job were corrected (a car caught cheating
    after the batch ended: docs/verification.md, "Delivery"), so that the file holds the platform's rows. The
    file keeps its id; the requests in it stay the same (a corrected unit was computed). False when the job
    is no batch's, the batch is not finalized, or its output file is gone."""
    with transaction.atomic():  # the batch's lock: of two corrections at once, the later rewrite reads both
        batch = Batch.objects.select_for_update().filter(job_id=job_id).exclude(finalized_at=None).first()
        job = Job.objects.select_related("ai_model").filter(pk=job_id).first()
        if batch is None or job is None or not batch.output_file_id:
            return False
        content = batches.jsonl(_batch_lines(batch=batch, job=job).output)
        return bool(BatchFile.objects.filter(public_id=batch.output_file_id).update(content=content,
                                                                                   bytes=len(content)))


def batch_files_expire() -> int:
    """Delete, content and all, every batch file whose retention has ended (the ``batch-files-expire`` task).
    A batch keeps the ids of its deleted files, as after ``DELETE /v1/files/{id}``."""
    deleted, _ = BatchFile.objects.filter(expires_at__lt=timezone.now()).delete()
    if deleted:
        log.info("%s expired batch files deleted", deleted)
    return deleted
