"""The demo buyer of the embedded profile: keeps one job of standard-library docstrings open, so the market
in `make run` always has work to clear. Buyers pay in advance; the demo buyer's balance is kept up by the
platform's demo credit (a ledger grant), so card top-ups on the billing page stay the visitor's to try."""

import json
import random
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from billing.models import LedgerAccount
from billing.selectors import account_balance_minor
from billing.services import account_get, balance_grant
from marketplace import corpus, flows
from marketplace.models import Job, User

BUYER = "buyer@demo.local"
DEMO_CREDIT_MINOR = 50_000  # granted whenever the demo buyer's balance falls below it


def demo_job_top_up(*, docs: int = 400) -> Job | None:
    """Submit a new demo job, with a bid drawn around the market, if the demo buyer has none open."""
    buyer = User.objects.filter(email=BUYER).select_related("organisation").first()
    if buyer is None or Job.objects.filter(organisation=buyer.organisation, state__in=Job.OPEN_STATES).exists():
        return None
    balance = account_balance_minor(account=account_get(
        kind=LedgerAccount.Kind.BUYER, currency=settings.CURRENCY, organisation=buyer.organisation))
    if balance < DEMO_CREDIT_MINOR:
        balance_grant(organisation=buyer.organisation, amount_minor=DEMO_CREDIT_MINOR, note="demo credit")
    rng = random.Random()
    start = rng.randrange(0, 1500)
    rows = corpus.documents(start + docs)[start:]
    return flows.job_create(
        organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2", precision=rng.choice(["int8", "fp32"]),
        max_price_micros=rng.choice([400_000, 800_000, 1_500_000, 2_000_000]),
        deadline=timezone.now() + timedelta(hours=1), inputs=(json.dumps(r).encode() for r in rows))
