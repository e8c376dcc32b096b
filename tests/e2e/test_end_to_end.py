"""One buyer job travels top-up -> bid -> auction -> cars -> results -> ledger -> owners' payouts, with every
part real: the ASGI server on loopback (plus Celery worker and beat in the services profile), three car agent
processes pairing and computing over websockets, the REST API for the buyer, the local Stripe peer for the
card top-up and the owners' Connect transfers, and the reconciliation at the end."""

import io
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db.models import Sum
from django.utils import timezone

from billing import payments, payouts
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, MeterRecord, Payout, Reservation, TopUp
from billing.money import femto_per_minor
from billing.selectors import account_balance_minor, buyer_balance_minor, unbalanced_transaction_ids
from fleet import services as fleet
from fleet.agent.models import get_runner
from fleet.models import HardwareGeneration, Lease, Vehicle, WorkUnit
from marketplace import corpus, services
from marketplace.models import AuctionRound, Job
from tests.conftest import DEPLOYED_VERIFICATION, jsonl
from tests.factories import BuyerFactory, OwnerFactory
from tests.support.live import live_product
from tests.support.stripe_peer import PeerClient

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DOCS = 300
CARS = 3
# Prices far above today's market (about $0.002 per 10^15 ops) so that the job costs whole dollars and the
# ledger assertions compare non-trivial amounts.
BID_MICROS = 5_000_000_000
TOP_UP_MINOR = 2_500  # $25.00 by card: enough for the job's reservation at the bid (about $4)
OUTPUT = Path(settings.BASE_DIR) / "test-output"


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_job_of_300_documents_is_computed_by_three_real_agents_booked_paid_for_and_settled(tmp_path, settings):
    # Given a buyer with nothing on its balance and an API key, and three owners whose cars have pairing codes,
    buyer = BuyerFactory(organisation__credit=0)
    _, key = services.api_key_create(organisation=buyer.organisation, name="e2e", created_by=buyer)
    hw4 = HardwareGeneration.objects.get(code="HW4")
    codes = []
    for i in range(CARS):
        vehicle, code = fleet.vehicle_create(owner=OwnerFactory(), name=f"E2E car {i}", hardware=hw4)
        fleet.policy_update(vehicle=vehicle, reserve_price_micros=1_000_000_000 * (i + 1))
        codes.append(code)
    docs = corpus.documents(DOCS)

    # A short auction interval, so that one car's capacity per round is less than the job needs and the
    # clearing spreads the job over the three cars (by reserve price, cheapest first).
    with live_product(tmp_path, AUCTION_INTERVAL_S="0.5") as (base, procs):
        # when three real agents pair and connect over websockets,
        for i, code in enumerate(codes):
            procs.start(f"agent{i}", [sys.executable, "-m", "fleet.agent", "--server", base, "--pair", code,
                                      "--state-file", str(tmp_path / f"agent{i}.json"), "--battery", "85",
                                      "--plugged-in", "--wifi"], FLEET_ORT_THREADS="1")
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        # and the buyer tops up by card, and the owners finish Stripe's onboarding, on the product's local peer,
        settings.STRIPE_API_BASE = procs.env["STRIPE_API_BASE"]
        stripe = PeerClient(SimpleNamespace(url=settings.STRIPE_API_BASE), settings.STRIPE_SECRET_KEY or "sk_test")
        top_up = payments.top_up_create(organisation=buyer.organisation, amount_minor=TOP_UP_MINOR,
                                        payment_method_id="pm_card_visa")
        assert top_up.status == TopUp.Status.SUCCEEDED
        for vehicle in Vehicle.objects.select_related("owner").filter(name__startswith="E2E car "):
            payouts.onboarding_link_create(owner=vehicle.owner, refresh_url=base, return_url=base)
            account = vehicle.owner.connected_account
            payouts.connected_account_sync(account=account, stripe_account=stripe.onboard(account.stripe_account_id))
        deadline = time.monotonic() + 60
        while api.get("/healthz").json()["vehicles_connected"] < CARS:
            assert time.monotonic() < deadline, procs.logs()
            time.sleep(0.3)

        # and the buyer submits a job through the REST API,
        started = time.monotonic()
        response = api.post("/api/v1/jobs/", data={
            "model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": str(BID_MICROS),
            "deadline": (timezone.now() + timedelta(hours=1)).isoformat()},
            files={"inputs": ("docs.jsonl", jsonl(docs), "application/x-ndjson")})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        # then the job completes,
        deadline = time.monotonic() + 120
        while (state := api.get(f"/api/v1/jobs/{job_id}/").json())["state"] != "completed":
            assert time.monotonic() < deadline, f"job stuck: {state}\n{procs.logs()}"
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        results = [json.loads(line) for line in api.get(f"/api/v1/jobs/{job_id}/results/").text.splitlines()]
        # and the weekly settlement runs (no holdback here), and the reconciliation, while Stripe is up.
        settings.STRIPE_PAYOUT_HOLDBACK_DAYS, settings.STRIPE_MIN_PAYOUT_MINOR = 0, 1
        run = payouts.settlement_run(now=timezone.now() + timedelta(seconds=1))
        transfers = stripe.objects("transfers", transfer_group=run.transfer_group)
        reconciliation = io.StringIO()
        call_command("billing_reconcile", stdout=reconciliation)

    # with every agent's one session kept for the whole job (no dropped sockets),
    for i in range(CARS):
        assert "connection lost" not in (tmp_path / f"agent{i}.log").read_text(), f"agent{i} was disconnected"
    # with one embedding per input, in input order, equal to the same model run directly,
    assert [r["id"] for r in results] == [d["id"] for d in docs]
    direct = get_runner("all-minilm-l6-v2", "int8").embed([d["text"] for d in docs])
    similarities = [cosine(np.array(r["embedding"]), direct[i]) for i, r in enumerate(results)]
    assert min(similarities) >= 0.99

    # computed by several cars (one car's capacity per round is less than the job; whether the dearest of
    # the three is needed depends on how fast the other two are), every unit paid by the buyer exactly once,
    # and the new cars' results checked (docs/verification.md: their first results are all replicated, on a car
    # of another owner, and the platform pays that car): every completed lease is a paid result or a paid
    # check, and no honest car's result was found wrong;
    job = Job.objects.get(pk=job_id)
    metered = MeterRecord.objects.filter(job=job).select_related("unit")
    records = list(metered.filter(role=MeterRecord.Role.BUYER))
    checks = list(metered.filter(role=MeterRecord.Role.CHECK))
    assert len(records) == job.units_total == WorkUnit.objects.filter(job=job, state="done").count()
    assert len({r.unit_id for r in records}) == job.units_total
    assert {r.vehicle_id for r in records} == set(job.units.values_list("completed_by", flat=True)) and len(
        {r.vehicle_id for r in records}) >= 2
    completed = Lease.objects.filter(unit__job=job, outcome="completed")
    # the servers verify as deployed (this process does not, tests/conftest.py): a new car's first results are
    # all checked
    for vehicle_id in {r.vehicle_id for r in records}:
        mine = completed.filter(vehicle_id=vehicle_id).order_by("ended_at")[:DEPLOYED_VERIFICATION["VERIFY_PROBATION"]]
        assert all(lease.verdict in ("agreed", "right") for lease in mine), [lease.verdict for lease in mine]
    assert all(c.charge_femto == 0 and c.owner_id != r.owner_id
               for c in checks for r in records if r.unit_id == c.unit_id)
    assert completed.count() == len(records) + len(checks)
    assert not Lease.objects.filter(unit__job=job, verdict__in=["wrong", "voided", "pending"]).exists()
    # each metered with its tokens, compute, energy, time on the car and its round's clearing price,
    assert all(r.tokens > 0 and r.mops > 0 and r.energy_mwh > 0 and r.duration_ms > 0 for r in records)

    # and the ledger balances: the job reserved its cost at the bid when it was created, paid its exact cost
    # at the clearing prices rounded up once, and gave the rest back when it completed;
    assert unbalanced_transaction_ids() == []
    assert MeterRecord.objects.filter(job=job, price_micros__lt=1_000_000_000).count() == 0  # reserves respected
    per_minor = femto_per_minor(job.currency)
    clearing_prices = set(AuctionRound.objects.filter(market=job.precision).values_list("clearing_price_micros",
                                                                                          flat=True))
    for record in records:
        # (the price of the lease it completed: a replicated unit's allocation is its second car's since)
        lease = Lease.objects.get(unit=record.unit, epoch=record.epoch)
        assert record.price_micros == lease.price_micros <= BID_MICROS
        assert record.price_micros in clearing_prices
    exact = sum(r.mops * r.price_micros for r in records)
    reservation = Reservation.objects.get(job=job)
    buyer_paid = reservation.drawn_minor
    assert buyer_paid == -(-exact // per_minor) > 0 and reservation.charged_femto == exact
    assert reservation.amount_minor == -(-job.mops_total * BID_MICROS // per_minor) >= buyer_paid
    assert reservation.status == Reservation.Status.RELEASED
    assert buyer_balance_minor(organisation=buyer.organisation) == TOP_UP_MINOR - buyer_paid
    assert buyer_balance_minor(organisation=buyer.organisation, kind="buyer_reserved") == 0
    # the owners got units x price less the fee, for their results and for their checks (paid by the platform),
    fee = settings.PLATFORM_FEE_BPS
    owed = {}
    for owner_id in {r.owner_id for r in records + checks}:
        mine = [r for r in records + checks if r.owner_id == owner_id]
        owed[owner_id] = sum(r.mops * r.price_micros * (10_000 - fee) // 10_000 for r in mine) // per_minor
        earned = LedgerEntry.objects.filter(account__kind="owner", account__owner_id=owner_id,
                                            transaction__kind__in=["usage", "verification"]
                                            ).aggregate(total=Sum("amount_minor"))["total"]
        assert earned == owed[owner_id]
        # (and, once paid, owes them nothing more)
        assert account_balance_minor(account=LedgerAccount.objects.get(kind="owner", owner_id=owner_id)) == 0
    platform = account_balance_minor(account=LedgerAccount.objects.get(kind="platform_fee", currency=job.currency))
    # and the settlement paid each owner's payable as one Transfer in one group,
    paid = {p.owner_id: p.amount_minor for p in Payout.objects.filter(run=run, status=Payout.Status.SENT)}
    assert paid == {owner: amount for owner, amount in owed.items() if amount}
    assert sorted(t["amount"] for t in transfers) == sorted(paid.values())
    # and the reconciliation of the ledger with Stripe's objects found no difference.
    assert "No differences" in reconciliation.getvalue(), reconciliation.getvalue()
    money = {"top_up_minor": TOP_UP_MINOR, "reserved_minor": reservation.amount_minor, "job_cost_minor": buyer_paid,
             "job_exact_femto": exact, "owners_minor": sorted(owed.values()), "platform_fee_minor": platform,
             "rounding_minor": buyer_paid - sum(owed.values()) - platform, "payouts_minor": sorted(paid.values()),
             "balance_after_minor": TOP_UP_MINOR - buyer_paid}
    print("e2e money:", json.dumps(money))
    for txn in LedgerTransaction.objects.exclude(kind="usage").order_by("pk"):  # the units' are in the figures
        entries = {f"{e.account.kind}:{e.account.owner_id or e.account.organisation_id or ''}": e.amount_minor
                   for e in txn.entries.select_related("account")}
        print(f"  {txn.kind:12} {txn.description[:44]:44} sum={sum(entries.values())} {entries}")

    OUTPUT.mkdir(exist_ok=True)
    figures = {"profile": "services" if settings.REDIS_URL else "embedded", "docs": DOCS, "cars": CARS,
               "units": job.units_total, "seconds": round(elapsed, 2), "embeddings_per_s": round(DOCS / elapsed, 1),
               "min_cosine": round(min(similarities), 5), "buyer_paid_minor": buyer_paid, "money": money}
    (OUTPUT / f"e2e-{figures['profile']}.json").write_text(json.dumps(figures))
    print("e2e:", json.dumps(figures))
