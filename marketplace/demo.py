"""The demo buyer of the embedded profile: keeps one job of standard-library docstrings open per workload (each
workload module's demo parameters, fleet.workloads), so the market in `make run` always has work of every kind
to clear. Buyers pay in advance; the demo buyer's balance is kept up by the
platform's demo credit (a ledger grant), so card top-ups on the billing page stay the visitor's to try."""

import json
import random
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from billing.models import LedgerAccount
from billing.selectors import account_balance_minor
from billing.services import account_get, balance_grant
from fleet import workloads
from marketplace import corpus, flows
from marketplace.models import AIModel, Job, User

BUYER = "buyer@demo.local"
DEMO_CREDIT_MINOR = 50_000  # granted whenever the demo buyer's balance falls below it


def demo_job_top_up(*, docs: int = 400) -> list[Job]:
    """Submit a new demo job, with a bid drawn around the market, for each workload the demo buyer has no open
    job of (on the workload's first catalogue model). Returns the jobs made."""
    buyer = User.objects.filter(email=BUYER).select_related("organisation").first()
    if buyer is None:
        return []
    open_tasks = set(Job.objects.filter(organisation=buyer.organisation, state__in=Job.OPEN_STATES)
                     .values_list("ai_model__task", flat=True))
    made = []
    rng = random.Random()
    for workload in workloads.WORKLOADS.values():
        model = AIModel.objects.filter(task=workload.task, active=True).order_by("slug").first()
        if workload.task in open_tasks or model is None:
            continue
        balance = account_balance_minor(account=account_get(
            kind=LedgerAccount.Kind.BUYER, currency=settings.CURRENCY, organisation=buyer.organisation))
        if balance < DEMO_CREDIT_MINOR:
            balance_grant(organisation=buyer.organisation, amount_minor=DEMO_CREDIT_MINOR, note="demo credit")
        start, count = rng.randrange(0, 1500), workload.demo_docs or docs
        rows = (corpus.page_documents(count, start=start) if workload.demo_input == "page"
                else corpus.documents(start + count)[start:])
        made.append(flows.job_create(
            organisation=buyer.organisation, user=buyer, model_slug=model.slug,
            precision=rng.choice(model.precisions), max_price_micros=rng.choice([400_000, 800_000, 1_500_000, 2_000_000]),
            deadline=timezone.now() + timedelta(hours=1), inputs=(json.dumps(r).encode() for r in rows),
            params=workload.demo_params))
    return made
