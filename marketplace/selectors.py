import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

import numpy as np
from django.db.models import Count, F, Q, QuerySet, Sum

from billing.models import MeterRecord
from billing.money import femto_per_minor, price_per_million_tokens_micros
from fleet.models import WorkUnit
from marketplace.models import AIModel, ApiKey, AuctionRound, Job, Organisation, WebhookDelivery, WebhookEndpoint


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


def webhook_endpoints_for(*, organisation: Organisation) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(organisation=organisation, disabled_at=None)


def webhook_deliveries_for(*, endpoint: WebhookEndpoint) -> QuerySet[WebhookDelivery]:
    return endpoint.deliveries.select_related("event").order_by("-created_at", "-pk")


def last_clearing_price(*, precision: str) -> int | None:
    return (AuctionRound.objects.filter(market=precision, clearing_price_micros__isnull=False)
            .order_by("-cleared_at").values_list("clearing_price_micros", flat=True).first())


def model_prices(*, ai_model: AIModel) -> dict[str, int | None]:
    """Micro-units per million tokens of this model at the last clearing price of each precision."""
    prices = {}
    for precision in ai_model.precisions:
        price = last_clearing_price(precision=precision)
        prices[precision] = None if price is None else price_per_million_tokens_micros(
            price_micros=price, ops_per_token=ai_model.ops_per_token)
    return prices


def job_results_lines(*, job: Job) -> Iterator[str]:
    """The job's results as JSON Lines in input order, streamed unit by unit."""
    index = 0
    units = WorkUnit.objects.filter(job=job).order_by("seq").only("seq", "inputs", "result", "state")
    for unit in units.iterator(chunk_size=50):
        for doc, encoded in zip(unit.inputs, unit.result or [None] * len(unit.inputs)):
            row = {"index": index, "id": doc.get("id")}
            if encoded is None:
                row["error"] = "not computed"
            else:
                vector = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
                row["embedding"] = [round(v, 7) for v in vector.tolist()]
            yield json.dumps(row, separators=(",", ":")) + "\n"
            index += 1


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


def jobs_budget_left_femto(*, job_ids: list[int]) -> dict[int, int]:
    """For the jobs among ``job_ids`` that have a budget cap: what is left of it, in femto-units (see
    billing.money), after what was charged and what leased units will cost at their lease's price."""
    capped = dict(Job.objects.filter(pk__in=job_ids, budget_cap_minor__isnull=False)
                  .values_list("pk", "budget_cap_minor"))
    if not capped:
        return {}
    currency = dict(Job.objects.filter(pk__in=capped).values_list("pk", "currency"))
    charged = dict(MeterRecord.objects.filter(job_id__in=capped).values("job_id").order_by()
                   .annotate(femto=Sum("charge_femto")).values_list("job_id", "femto"))
    leased = dict(WorkUnit.objects.filter(job_id__in=capped, state=WorkUnit.State.LEASED).values("job_id").order_by()
                  .annotate(femto=Sum(F("mops") * F("price_micros"))).values_list("job_id", "femto"))
    return {pk: cap * femto_per_minor(currency[pk]) - (charged.get(pk) or 0) - (leased.get(pk) or 0)
            for pk, cap in capped.items()}


def bid_quantity_mops(*, queued_mops: int, max_price_micros: int, budget_left_femto: int | None,
                      largest_unit_mops: int) -> int:
    """The mega-ops a job bids for in a round: its queued work, or, when its budget cap cannot pay all of it
    at the bid, what the rest of the budget pays less one unit, since the dispatcher may lease the last unit
    of an allocation whole. So the job never spends beyond its cap."""
    if budget_left_femto is None or queued_mops * max_price_micros <= budget_left_femto:
        return queued_mops
    return max(0, budget_left_femto // max_price_micros - largest_unit_mops)
