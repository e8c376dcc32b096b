import base64
import json
from typing import Iterator

import numpy as np
from django.db.models import QuerySet

from billing.money import price_per_million_tokens_micros
from fleet.models import WorkUnit
from marketplace.models import AIModel, ApiKey, AuctionRound, Job, Organisation


def organisation_of(request) -> Organisation | None:
    """The buyer organisation a request acts for: its API key's, else the signed-in member's."""
    auth = getattr(request, "auth", None)  # only DRF requests carry one
    if isinstance(auth, ApiKey):
        return auth.organisation
    user = request.user
    return user.organisation if user.is_authenticated and user.is_buyer else None


def jobs_for(*, organisation: Organisation) -> QuerySet[Job]:
    return Job.objects.filter(organisation=organisation).select_related("ai_model")


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
