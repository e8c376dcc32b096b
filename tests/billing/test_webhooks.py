"""Stripe webhooks: signature and timestamp checked, every event acts at most once in any order."""

import json
import random
import time

import pytest
from django.test import Client

from billing import payments, payouts, stripe_api
from billing.models import ConnectedAccount, LedgerAccount, LedgerTransaction, Refund, StripeEvent, TopUp
from billing.selectors import account_balance_minor, unbalanced_transaction_ids
from tests.factories import BuyerFactory, OwnerFactory

pytestmark = [pytest.mark.django_db, pytest.mark.urls("billing.urls")]
URL = "/stripe/webhook/"


def deliver(event: dict, *, secret: str = "whsec_billing_tests", timestamp: int | None = None, tamper=False):
    payload = json.dumps(event).encode()
    header = stripe_api.webhook_sign(payload=payload, secret=secret, timestamp=int(timestamp or time.time()))
    if tamper:
        payload = payload.replace(b'"amount": ', b'"amount": 9')
    return Client().post(URL, data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)


def event(event_id: str, event_type: str, obj: dict) -> dict:
    return {"id": event_id, "object": "event", "type": event_type, "created": int(time.time()),
            "data": {"object": obj}, "api_version": stripe_api.API_VERSION}


def balance(kind, **party):
    account = LedgerAccount.objects.filter(kind=kind, **party).first()
    return account_balance_minor(account=account) if account else 0


def test_a_tampered_signature_a_wrong_secret_a_stale_or_future_timestamp_are_refused(stripe_peer):
    obj = {"id": "pi_x", "object": "payment_intent", "amount": 100}
    assert deliver(event("evt_ok", "payment_intent.succeeded", obj)).status_code == 200
    assert deliver(event("evt_1", "payment_intent.succeeded", obj), tamper=True).status_code == 400
    assert deliver(event("evt_2", "payment_intent.succeeded", obj), secret="whsec_other").status_code == 400
    # timestamps taken at delivery, a few seconds beyond the 300 s tolerance so a slow machine cannot blur them
    assert deliver(event("evt_3", "payment_intent.succeeded", obj), timestamp=time.time() - 305).status_code == 400
    assert deliver(event("evt_4", "payment_intent.succeeded", obj), timestamp=time.time() + 305).status_code == 400
    assert deliver(event("evt_5", "payment_intent.succeeded", obj), timestamp=time.time() + 250).status_code == 200
    assert deliver(event("evt_6", "payment_intent.succeeded", obj), timestamp=time.time() - 250).status_code == 200
    unsigned = Client().post(URL, data=b"{}", content_type="application/json")
    assert unsigned.status_code == 400
    assert set(StripeEvent.objects.values_list("event_id", flat=True)) == {"evt_ok", "evt_5", "evt_6"}


def test_an_unhandled_type_is_answered_200_and_stored_as_ignored(stripe_peer):
    response = deliver(event("evt_cust", "customer.created", {"id": "cus_1", "object": "customer"}))
    assert response.status_code == 200 and response.json()["status"] == "ignored"


def test_a_transient_stripe_failure_answers_503_and_stores_nothing_so_stripe_retries(stripe_peer, monkeypatch):
    org = BuyerFactory(organisation__credit=0).organisation
    top_up = TopUp.objects.create(organisation=org, amount_minor=500, currency="usd", payment_method_id="pm_x",
                                  payment_intent_id="pi_transient")

    def unavailable(charge_id):
        raise stripe_api.StripeUnavailable("down")

    monkeypatch.setattr(payments, "_fee_minor", unavailable)
    obj = {"id": "pi_transient", "object": "payment_intent", "status": "succeeded", "latest_charge": "ch_t"}
    assert deliver(event("evt_t", "payment_intent.succeeded", obj)).status_code == 503
    assert not StripeEvent.objects.exists() and TopUp.objects.get(pk=top_up.pk).status == TopUp.Status.CREATED
    monkeypatch.undo()


def test_every_event_delivered_two_to_five_times_in_shuffled_order_has_one_effect(stripe_peer, settings):
    # given real objects at the peer: a buyer's top-up (not yet booked: its answer was "lost"), a refund
    # whose answer was lost too, a dispute, and an owner's connected account with a pending payout
    org = BuyerFactory(organisation__credit=0).organisation
    stripe_peer.network.lose_next("POST", "/confirm")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.top_up_create(organisation=org, amount_minor=5000, payment_method_id="pm_card_visa")
    top_up = TopUp.objects.get()
    intent = stripe_peer.get(f"/v1/payment_intents/{top_up.payment_intent_id}")
    charge_id = intent["latest_charge"]["id"]
    owner = OwnerFactory()
    account = payouts.connected_account_ensure(owner=owner)
    stripe_account = stripe_peer.onboard(account.stripe_account_id)

    events = [
        event("evt_pi_failed", "payment_intent.payment_failed", {**intent, "status": "requires_payment_method",
                                                                 "last_payment_error": {"message": "declined"}}),
        event("evt_pi_ok", "payment_intent.succeeded", intent),
        event("evt_dispute", "charge.dispute.created", {"id": "dp_1", "object": "dispute", "amount": 1200,
                                                       "charge": charge_id, "payment_intent": intent["id"],
                                                       "currency": "usd", "reason": "fraudulent"}),
        event("evt_account", "account.updated", stripe_account),
        event("evt_other", "balance.available", {"object": "balance"}),
        event("evt_unknown_pi", "payment_intent.succeeded", {**intent, "id": "pi_not_ours", "metadata": {}}),
    ]
    deliveries = [e for e in events for _ in range(random.Random(e["id"]).randint(2, 5))]
    random.Random(7).shuffle(deliveries)
    # when they all arrive, shuffled and repeated
    for delivered in deliveries:
        assert deliver(delivered).status_code == 200
    # then each event acted once: the top-up credited once (success wins over the failure), the dispute
    # taken from the balance once, the account marked active
    top_up.refresh_from_db()
    assert top_up.status == TopUp.Status.SUCCEEDED and top_up.disputed_minor == 1200
    assert balance("buyer", organisation=org) == 5000 - 1200
    assert LedgerTransaction.objects.filter(kind="top_up").count() == 1
    assert LedgerTransaction.objects.filter(kind="dispute").count() == 1
    assert ConnectedAccount.objects.get().can_receive_transfers
    assert StripeEvent.objects.count() == len(events)
    assert StripeEvent.objects.get(event_id="evt_unknown_pi").outcome.startswith("not ours")
    assert unbalanced_transaction_ids() == []

    # and a refund whose answer was lost is confirmed by charge.refunded, however often it arrives
    stripe_peer.network.lose_next("POST", "/v1/refunds")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.refund_create(top_up=top_up, amount_minor=300)
    charge = stripe_peer.get(f"/v1/charges/{charge_id}")
    refunded = event("evt_refunded", "charge.refunded", charge)
    for _ in range(3):
        assert deliver(refunded).status_code == 200
    refund = Refund.objects.get()
    assert refund.status == Refund.Status.SUCCEEDED and refund.stripe_refund_id == charge["refunds"]["data"][0]["id"]
    assert balance("buyer", organisation=org) == 5000 - 1200 - 300
    assert LedgerTransaction.objects.filter(kind="refund").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_peer_s_own_signed_deliveries_are_verified_and_processed_once(stripe_peer, live_server, settings):
    # given the peer delivers its events to our live endpoint, signed with our secret
    settings.ROOT_URLCONF = "billing.urls"
    stripe_peer.peer.register_webhook(url=f"{live_server.url}{URL}", secret=settings.STRIPE_WEBHOOK_SECRET,
                                      events=["payment_intent.succeeded"])
    org = BuyerFactory(organisation__credit=0).organisation
    # when a top-up succeeds (booked by our own call; the peer's event follows about a second later)
    top_up = payments.top_up_create(organisation=org, amount_minor=900, payment_method_id="pm_card_visa")
    deadline = time.monotonic() + 15
    # (the peer may still be delivering events of earlier tests' top-ups: this one's is awaited by its id)
    ours = StripeEvent.objects.filter(type="payment_intent.succeeded",
                                       payload__data__object__id=top_up.payment_intent_id)
    while not ours.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    # then the event passed our signature check and changed nothing more
    received = ours.get()
    assert received.outcome == f"top-up {top_up.pk} already credited"
    assert balance("buyer", organisation=org) == 900
