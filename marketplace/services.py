"""Everything in the marketplace that writes: organisations and API keys, jobs, auction rounds."""

import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Iterable

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q, Sum
from django.utils import timezone
from django.utils.text import slugify

from fleet import tokens
from fleet.agent.models import count_tokens
from fleet.models import Lease, WorkUnit
from fleet.selectors import vehicle_consents, vehicles_offering
from fleet.services import leases_withdraw
from marketplace import clearing
from marketplace.errors import ValidationFailed
from marketplace.models import AIModel, Allocation, ApiKey, AuctionRound, Job, Organisation, User

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


# --- jobs ----------------------------------------------------------------------------------------------

def _parse_line(raw: bytes, number: int) -> dict | str | None:
    """One JSON Lines row: a document dict, an error message, or None for a blank line."""
    if len(raw) > settings.MAX_UPLOAD_LINE_BYTES:
        return f"line is longer than {settings.MAX_UPLOAD_LINE_BYTES} bytes"
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
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return '"text" must be a non-empty string'
    doc_id = row.get("id")
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or len(str(doc_id)) > 256):
        return '"id" must be a string or an integer of at most 256 characters'
    return {"id": doc_id, "text": text}


def _units_create(*, job: Job, seq: int, docs: list[dict]) -> int:
    """Create one work unit from ``docs``; returns its mega-ops."""
    counts = count_tokens(job.ai_model.runtime, [d["text"] for d in docs])
    tokens_total = sum(counts)
    mops = math.ceil(tokens_total * job.ai_model.ops_per_token / 10**6)
    WorkUnit.objects.create(job=job, seq=seq, inputs=docs, tokens=tokens_total, mops=mops)
    job.tokens_total += tokens_total
    job.mops_total += mops
    return mops


def job_create(*, organisation: Organisation, user: User | None, model_slug: str, precision: str,
               max_price_micros: int, deadline: datetime, inputs: Iterable[bytes]) -> Job:
    """Create a job from JSON Lines inputs, streamed: every line is checked, bad lines are reported by
    number, and nothing is created unless the whole file is good."""
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
    if errors:
        raise ValidationFailed("The job is not valid.", extra={"fields": errors})

    bad_lines: list[dict] = []
    bad_count = 0
    with transaction.atomic():
        job = Job.objects.create(organisation=organisation, created_by=user, ai_model=ai_model, precision=precision,
                                 max_price_micros=max_price_micros, deadline=deadline, currency=settings.CURRENCY)
        batch: list[dict] = []
        for number, raw in enumerate(inputs, start=1):
            parsed = _parse_line(raw, number)
            if isinstance(parsed, str):
                bad_count += 1
                if len(bad_lines) < settings.MAX_ERRORS_REPORTED:
                    bad_lines.append({"line": number, "message": parsed})
                continue
            if parsed is None or bad_count:
                continue  # after the first bad line, only validate
            batch.append(parsed)
            job.docs_total += 1
            if len(batch) == settings.DOCS_PER_UNIT:
                _units_create(job=job, seq=job.units_total, docs=batch)
                job.units_total += 1
                batch = []
        if batch and not bad_count:
            _units_create(job=job, seq=job.units_total, docs=batch)
            job.units_total += 1
        if bad_count:
            transaction.set_rollback(True)
        elif job.docs_total == 0:
            transaction.set_rollback(True)
            raise ValidationFailed("The inputs file holds no documents.", code="invalid_inputs",
                                   extra={"lines": []})
        else:
            job.save(update_fields=["docs_total", "tokens_total", "mops_total", "units_total"])
    if bad_count:
        raise ValidationFailed(f"{bad_count} line(s) of the inputs file are not valid; nothing was created.",
                               code="invalid_inputs", extra={"lines": bad_lines, "bad_line_count": bad_count})
    return job


def _job_close(*, job: Job, state: str, reason: str) -> None:
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        if job.state not in Job.OPEN_STATES:
            return
        leased = (WorkUnit.objects.filter(job=job, state=WorkUnit.State.LEASED)
                  .values_list("leased_to_id", "pk", "lease_epoch"))
        by_vehicle: dict[int, list] = defaultdict(list)
        for vehicle_id, unit_id, epoch in leased:
            by_vehicle[vehicle_id].append((unit_id, epoch))
        for vehicle_id, refs in by_vehicle.items():
            leases_withdraw(vehicle_id=vehicle_id, reason=reason, notify=True, outcome=Lease.Outcome.CANCELLED, only=refs)
        WorkUnit.objects.filter(job=job, state=WorkUnit.State.QUEUED).update(state=WorkUnit.State.CANCELLED)
        job.state, job.finished_at = state, now
        job.save(update_fields=["state", "finished_at"])


def job_cancel(*, job: Job) -> Job:
    """Stop a job: its queued units are cancelled and its active leases withdrawn. Finished units stay paid."""
    _job_close(job=job, state=Job.State.CANCELLED, reason="job_cancelled")
    job.refresh_from_db()
    return job


def jobs_expire() -> int:
    overdue = list(Job.objects.filter(state__in=Job.OPEN_STATES, deadline__lt=timezone.now()))
    for job in overdue:
        _job_close(job=job, state=Job.State.EXPIRED, reason="job_expired")
    return len(overdue)


# --- auction -------------------------------------------------------------------------------------------

def _round_clear(*, market: str, now: datetime, seconds_left: dict[int, float]) -> AuctionRound:
    interval = settings.AUCTION_INTERVAL_S
    jobs = (Job.objects.filter(state__in=Job.OPEN_STATES, precision=market).select_related("ai_model")
            .annotate(queued_mops=Sum("units__mops", filter=Q(units__state=WorkUnit.State.QUEUED)))
            .filter(queued_mops__gt=0).order_by("pk"))
    bids = [clearing.Bid(id=job.pk, price=job.max_price_micros, quantity=job.queued_mops) for job in jobs]
    rates, vehicles = {}, {}
    offers = []
    for vehicle, rate, time_left in vehicles_offering(precision=market, now=now):
        rates[vehicle.pk], vehicles[vehicle.pk] = rate, vehicle
        parked = interval if time_left is None else min(interval, time_left)  # a car sells only time it will be parked
        quantity = int(rate * seconds_left.setdefault(vehicle.pk, parked))
        offers.append(clearing.Offer(id=vehicle.pk, price=vehicle.policy.reserve_price_micros, quantity=quantity))
    job_of = {job.pk: job for job in jobs}

    def consent(job_id: int, vehicle_id: int) -> bool:
        job = job_of[job_id]
        return vehicle_consents(vehicle=vehicles[vehicle_id], job_category=job.ai_model.task,
                                organisation_id=job.organisation_id)

    refused = sorted([b.id, o.id] for b in bids for o in offers if not consent(b.id, o.id))
    outcome = clearing.clear(bids, offers, _allowed(refused))
    per_pair: dict[tuple[int, int], int] = defaultdict(int)
    for fill in outcome.fills:
        seconds_left[fill.offer_id] -= fill.quantity / rates[fill.offer_id]
        per_pair[(fill.bid_id, fill.offer_id)] += fill.quantity
    with transaction.atomic():
        auction_round = AuctionRound.objects.create(
            market=market, cleared_at=now, interval_s=interval, clearing_price_micros=outcome.price,
            offered_mops=sum(o.quantity for o in offers), demanded_mops=sum(b.quantity for b in bids),
            sold_mops=outcome.volume,
            journal={"bids": [asdict(b) for b in bids], "offers": [asdict(o) for o in offers], "refused": refused,
                     "fills": [asdict(f) for f in outcome.fills], "price": outcome.price},
        )
        Allocation.objects.bulk_create(
            Allocation(round=auction_round, job_id=job_id, vehicle_id=vehicle_id, price_micros=outcome.price,
                       mops=mops, remaining_mops=mops)
            for (job_id, vehicle_id), mops in per_pair.items()
        )
    return auction_round


def auction_tick() -> list[AuctionRound]:
    """One auction interval: expire overdue jobs, then clear each market that has demand.

    A car that runs several precisions sells its time once: markets clear one after another (the market with
    the highest bid first) and each takes the seconds of the interval the previous ones left."""
    jobs_expire()
    now = timezone.now()
    tops = (Job.objects.filter(state__in=Job.OPEN_STATES, units__state=WorkUnit.State.QUEUED)
            .values("precision").annotate(top=Max("max_price_micros")).order_by())
    markets = [row["precision"] for row in sorted(tops, key=lambda r: (-r["top"], r["precision"]))]
    seconds_left: dict[int, float] = {}
    return [_round_clear(market=market, now=now, seconds_left=seconds_left) for market in markets]


def _allowed(refused: list[list[int]]):
    """The compatibility predicate of a round: every pair but the refused (job, car) pairs; None (every
    pair may trade, the plain clearing) when no owner refused anything."""
    if not refused:
        return None
    refused_pairs = {tuple(pair) for pair in refused}
    return lambda job_id, vehicle_id: (job_id, vehicle_id) not in refused_pairs


def round_replay(*, auction_round: AuctionRound) -> clearing.Outcome:
    """Clear a recorded round again from its journal (sealed inputs and the owners' refusals)."""
    journal = auction_round.journal
    return clearing.clear([clearing.Bid(**b) for b in journal["bids"]], [clearing.Offer(**o) for o in journal["offers"]],
                          _allowed(journal.get("refused", [])))



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


def catalogue_sync() -> None:
    """Make the model catalogue list every model the car agent's runtime can run (fleet.agent.models).
    Runs after every migrate; an operator's changes to description and ``active`` are kept."""
    from fleet.agent.models import MODELS

    for spec in MODELS.values():
        AIModel.objects.update_or_create(
            slug=spec.slug,
            defaults={"name": spec.name, "runtime": spec.slug, "precisions": list(spec.precisions), "dims": spec.dims,
                      "max_tokens": spec.max_tokens, "ops_per_token": spec.ops_per_token},
            create_defaults={"name": spec.name, "runtime": spec.slug, "precisions": list(spec.precisions),
                             "dims": spec.dims, "max_tokens": spec.max_tokens, "ops_per_token": spec.ops_per_token,
                             "task": "embedding",
                             "description": f"Sentence embeddings: {spec.dims} dimensions, documents of up to "
                                            f"{spec.max_tokens} tokens (longer ones are truncated)."},
        )
