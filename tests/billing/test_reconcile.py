"""End to end against the local peer: a buyer tops up, a job's units are completed on two owners' cars,
owners are settled, and reconciliation finds no difference; differences made behind our back are found."""

import io
import json
import time

import pytest
from django.core.management import CommandError, call_command
from django.db.models import F
from django.test import Client

from billing import payments, payouts, stripe_api
from billing.models import LedgerTransaction, Payout, Reservation
from billing.reconcile import reconcile
from billing.selectors import account_balance_minor, unbalanced_transaction_ids
from billing.services import reservation_release, usage_record
from fleet.models import WorkUnit
from marketplace import corpus, flows
from tests.conftest import jsonl
from tests.factories import BuyerFactory, VehicleFactory, future

pytestmark = [pytest.mark.django_db, pytest.mark.urls("billing.urls")]


def worked_example(stripe_peer, settings):
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS, settings.STRIPE_MIN_PAYOUT_MINOR = 0, 100
    buyer = BuyerFactory(organisation__credit=0)
    org = buyer.organisation
    cars = [VehicleFactory(), VehicleFactory()]
    for car in cars:
        payouts.onboarding_link_create(owner=car.owner, refresh_url="http://t/r", return_url="http://t/d")
        account = car.owner.connected_account
        payouts.connected_account_sync(account=account, stripe_account=stripe_peer.onboard(account.stripe_account_id))
    top_up = payments.top_up_create(organisation=org, amount_minor=10_000, payment_method_id="pm_card_visa")
    job = flows.job_create(organisation=org, user=buyer, model_slug="all-minilm-l6-v2", precision="int8",
                              max_price_micros=10**12, deadline=future(), budget_cap_minor=5_000,
                              inputs=jsonl(corpus.documents(8 * 6)).splitlines(keepends=True))
    for i, unit in enumerate(WorkUnit.objects.filter(job=job).order_by("seq")):
        # a clearing price of about 7.77 per unit, in micro-units per compute unit
        usage_record(unit=unit, vehicle=cars[i % 2], price_micros=777 * 10**13 // unit.mops, energy_mwh=1500)
    reservation_release(job=job)  # as its completion does
    run = payouts.settlement_run()
    return org, cars, top_up, job, run


def test_a_top_up_a_job_and_a_settlement_reconcile_with_no_difference(stripe_peer, settings, capsys):
    org, cars, top_up, job, run = worked_example(stripe_peer, settings)
    assert unbalanced_transaction_ids() == []
    assert reconcile() == []
    out = io.StringIO()
    call_command("billing_reconcile", stdout=out)
    assert "No differences" in out.getvalue()
    # The worked example for the record (pytest -s shows it).
    lines = []
    for txn in LedgerTransaction.objects.order_by("pk"):
        entries = {f"{e.account.kind}{':' + str(e.account.owner or e.account.organisation) if e.account.owner or e.account.organisation else ''}": e.amount_minor
                   for e in txn.entries.select_related("account", "account__owner", "account__organisation")}
        lines.append(f"{txn.kind:8} {txn.description[:40]:40} sum={sum(entries.values())} {entries}")
    transfers = stripe_peer.objects("transfers", transfer_group=run.transfer_group)
    lines.append(f"transfers in {run.transfer_group}: {[(t['amount'], t['destination']) for t in transfers]}")
    print("\n".join(lines))
    assert len(transfers) == 2 and all(p.status == Payout.Status.SENT for p in run.payouts.all())
    # each owner was paid exactly their payable balance; nothing is left on their accounts
    for car in cars:
        payout = run.payouts.get(owner=car.owner)
        assert account_balance_minor(account=car.owner.ledgeraccount_set.get(kind="owner")) == 0
        assert payout.amount_minor == sum(e.amount_minor for e in car.owner.ledgeraccount_set.get(kind="owner")
                                          .entries.filter(transaction__kind="usage"))


def test_differences_made_behind_our_back_are_each_reported(stripe_peer, settings):
    org, cars, top_up, job, run = worked_example(stripe_peer, settings)
    # a refund from Stripe's dashboard, a duplicate transfer into the run's group, a reversal we did not make
    stripe_peer.post("/v1/refunds", {"payment_intent": top_up.payment_intent_id, "amount": 50})
    destination = cars[0].owner.connected_account.stripe_account_id
    stripe_peer.post("/v1/transfers", {"amount": 5, "currency": "usd", "destination": destination,
                                       "transfer_group": run.transfer_group})
    payout = run.payouts.get(owner=cars[1].owner)
    stripe_peer.post(f"/v1/transfers/{payout.transfer_id}/reversals", {"amount": 1})
    # and a reservation changed without its ledger booking (as a bad manual edit would)
    Reservation.objects.filter(job=job).update(status=Reservation.Status.ACTIVE, amount_minor=F("amount_minor") + 7)
    differences = reconcile()
    whats = sorted(d.what.split(" ")[0] for d in differences)
    assert whats == ["refund", "reserved", "reversed", "transfer"], differences
    with pytest.raises(CommandError):
        call_command("billing_reconcile", stdout=io.StringIO())


def test_a_transfer_event_confirms_a_payout_whose_answer_was_lost(stripe_peer, settings):
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS = 0
    car = VehicleFactory()
    account = payouts.connected_account_ensure(owner=car.owner)
    payouts.connected_account_sync(account=account, stripe_account=stripe_peer.onboard(account.stripe_account_id))
    org = BuyerFactory().organisation
    payments.top_up_create(organisation=org, amount_minor=5000, payment_method_id="pm_card_visa")
    from billing.services import Posting, account_get, ledger_post

    ledger_post(kind="usage", description="usage", currency="usd", postings=[
        Posting(account_get(kind="buyer", currency="usd", organisation=org), -3000),
        Posting(account_get(kind="owner", currency="usd", owner=car.owner), 3000)])
    stripe_peer.network.lose_next("POST", "/v1/transfers")
    payout = payouts.settlement_run().payouts.get()
    assert payout.status == Payout.Status.PENDING
    transfer = stripe_peer.objects("transfers")[0]
    event = {"id": "evt_tr", "type": "transfer.created", "data": {"object": transfer}}
    payload = json.dumps(event).encode()
    for _ in range(3):
        header = stripe_api.webhook_sign(payload=payload, secret=settings.STRIPE_WEBHOOK_SECRET,
                                         timestamp=int(time.time()))
        response = Client().post("/stripe/webhook/", data=payload, content_type="application/json",
                                 HTTP_STRIPE_SIGNATURE=header)
        assert response.status_code == 200
    payout.refresh_from_db()
    assert payout.status == Payout.Status.SENT and payout.transfer_id == transfer["id"]
    assert reconcile() == []
