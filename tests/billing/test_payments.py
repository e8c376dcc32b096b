"""Buyers' top-ups, saved cards and refunds against the local Stripe peer."""

import pytest

from billing import payments, stripe_api
from billing.errors import BillingError
from billing.models import LedgerAccount, Refund, StripeRequest, TopUp
from billing.selectors import account_balance_minor, unbalanced_transaction_ids
from tests.factories import BuyerFactory

pytestmark = pytest.mark.django_db


def balance(kind, organisation=None):
    account = LedgerAccount.objects.filter(kind=kind, organisation=organisation).first()
    return account_balance_minor(account=account) if account else 0


def charges_at_stripe(stripe_peer, top_up):
    return [c for c in stripe_peer.objects("charges") if c["payment_intent"] == top_up.payment_intent_id]


@pytest.fixture
def org(db):
    return BuyerFactory(organisation__credit=0).organisation


def test_a_top_up_by_card_credits_the_balance_and_balances_against_stripe_clearing(stripe_peer, org):
    # given a buyer organisation, when it tops up 25.00 by card
    top_up = payments.top_up_create(organisation=org, amount_minor=2500, payment_method_id="pm_card_visa")
    # then Stripe charged once and the ledger credits the buyer against money held at Stripe
    assert top_up.status == TopUp.Status.SUCCEEDED and top_up.charge_id.startswith("ch_")
    assert len(charges_at_stripe(stripe_peer, top_up)) == 1
    assert balance("buyer", org) == 2500
    assert balance("stripe_clearing") + balance("stripe_fees") == -2500
    assert unbalanced_transaction_ids() == []
    # and every request that moved money was stored with its key
    assert set(StripeRequest.objects.values_list("key", flat=True)) >= {
        f"top_up:{top_up.pk}:create", f"top_up:{top_up.pk}:confirm"}


def test_a_declined_card_fails_the_top_up_and_books_nothing(stripe_peer, org):
    top_up = payments.top_up_create(organisation=org, amount_minor=2500,
                                    payment_method_id="pm_card_chargeCustomerFail")
    assert top_up.status == TopUp.Status.FAILED and top_up.failure_message
    assert balance("buyer", org) == 0


def test_a_lost_confirmation_answer_then_a_retry_charges_the_card_once(stripe_peer, org):
    # given the network loses Stripe's answer to the confirmation (the peer did charge)
    stripe_peer.network.lose_next("POST", "/confirm")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.top_up_create(organisation=org, amount_minor=4000, payment_method_id="pm_card_visa")
    top_up = TopUp.objects.get()
    assert top_up.status == TopUp.Status.CREATED and balance("buyer", org) == 0
    # when the top-up is retried (twice, for good measure)
    payments.top_up_confirm(top_up=top_up)
    payments.top_up_confirm(top_up=TopUp.objects.get())
    # then one charge, one credit
    top_up.refresh_from_db()
    assert top_up.status == TopUp.Status.SUCCEEDED
    assert len(charges_at_stripe(stripe_peer, top_up)) == 1
    assert balance("buyer", org) == 4000


def test_a_lost_create_answer_leaves_an_unconfirmed_intent_that_never_charges(stripe_peer, org):
    stripe_peer.network.lose_next("POST", "/v1/payment_intents")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.top_up_create(organisation=org, amount_minor=1000, payment_method_id="pm_card_visa")
    top_up = payments.top_up_confirm(top_up=TopUp.objects.get())
    assert top_up.status == TopUp.Status.SUCCEEDED and balance("buyer", org) == 1000
    intents = stripe_peer.objects("payment_intents")
    assert sorted(i["status"] for i in intents) == ["requires_confirmation", "succeeded"]
    assert len(stripe_peer.objects("charges")) == 1


def test_a_card_saved_through_a_setup_intent_pays_a_later_top_up(stripe_peer, org):
    # given the buyer saves a card (the browser confirms the SetupIntent with Stripe.js)
    setup = payments.card_setup_start(organisation=org)
    assert setup["client_secret"].startswith(setup["setup_intent_id"])
    pm = stripe_peer.post("/v1/payment_methods", {"type": "card", "card": {
        "number": "4242424242424242", "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
    stripe_api.setup_intent_confirm(setup["setup_intent_id"], payment_method=pm["id"])
    card = payments.card_setup_complete(organisation=org, setup_intent_id=setup["setup_intent_id"])
    assert (card.last4, card.exp_year) == ("4242", 2031)
    # when it tops up with the saved card, then the balance is credited
    top_up = payments.top_up_create(organisation=org, amount_minor=1200, payment_method_id=card.stripe_payment_method_id)
    assert top_up.status == TopUp.Status.SUCCEEDED and balance("buyer", org) == 1200
    # and another organisation cannot use that card
    other = BuyerFactory(organisation__credit=0).organisation
    with pytest.raises(BillingError):
        payments.top_up_create(organisation=other, amount_minor=1200, payment_method_id=card.stripe_payment_method_id)


def test_a_refund_never_exceeds_the_top_up_nor_the_unspent_balance_whatever_stripe_would_accept(stripe_peer, org):
    top_up = payments.top_up_create(organisation=org, amount_minor=3000, payment_method_id="pm_card_visa")
    refund = payments.refund_create(top_up=top_up, amount_minor=1000, reason="unused")
    assert refund.status == Refund.Status.SUCCEEDED and refund.stripe_refund_id.startswith("re_")
    assert balance("buyer", org) == 2000
    # the peer would accept any over-refund; we refuse it ourselves and nothing changes
    with pytest.raises(BillingError) as too_large:
        payments.refund_create(top_up=TopUp.objects.get(), amount_minor=2001)
    assert too_large.value.code == "refund_too_large"
    assert len(stripe_peer.objects("refunds", payment_intent=top_up.payment_intent_id)) == 1
    assert balance("buyer", org) == 2000 and unbalanced_transaction_ids() == []


def test_a_lost_refund_answer_then_a_retry_refunds_once(stripe_peer, org):
    top_up = payments.top_up_create(organisation=org, amount_minor=3000, payment_method_id="pm_card_visa")
    stripe_peer.network.lose_next("POST", "/v1/refunds")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.refund_create(top_up=top_up, amount_minor=700)
    refund = Refund.objects.get()
    assert refund.status == Refund.Status.PENDING and balance("buyer", org) == 2300  # held while unknown
    refund = payments.refund_send(refund=refund)
    payments.refund_send(refund=Refund.objects.get())
    assert refund.status == Refund.Status.SUCCEEDED
    assert len(stripe_peer.objects("refunds", payment_intent=top_up.payment_intent_id)) == 1
    assert balance("buyer", org) == 2300


def test_the_periodic_retry_finishes_a_top_up_and_a_refund_whose_answers_were_lost(stripe_peer, org):
    from datetime import timedelta

    from django.utils import timezone

    from billing.tasks import pending_retry

    stripe_peer.network.lose_next("POST", "/confirm")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.top_up_create(organisation=org, amount_minor=2000, payment_method_id="pm_card_visa")
    assert pending_retry.apply().get() == 0  # too young: the buyer's own retry may still come
    TopUp.objects.update(created_at=timezone.now() - timedelta(minutes=5))
    assert pending_retry.apply().get() == 1
    top_up = TopUp.objects.get()
    assert top_up.status == TopUp.Status.SUCCEEDED and len(charges_at_stripe(stripe_peer, top_up)) == 1

    stripe_peer.network.lose_next("POST", "/v1/refunds")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.refund_create(top_up=top_up, amount_minor=500)
    Refund.objects.update(created_at=timezone.now() - timedelta(minutes=5))
    assert payments.pending_retry() == 1
    assert Refund.objects.get().status == Refund.Status.SUCCEEDED
    assert len(stripe_peer.objects("refunds", payment_intent=top_up.payment_intent_id)) == 1
    assert balance("buyer", org) == 1500


def test_two_workers_never_talk_to_stripe_about_the_same_top_up_at_once(stripe_peer, org):
    from billing.services import AlreadyClaimed, stripe_claim

    top_up = TopUp.objects.create(organisation=org, amount_minor=1000, currency="usd", payment_method_id="pm_card_visa")
    with stripe_claim(top_up):
        with pytest.raises(AlreadyClaimed):
            payments.top_up_confirm(top_up=top_up)
    assert payments.top_up_confirm(top_up=top_up).status == TopUp.Status.SUCCEEDED
    assert TopUp.objects.get().claimed_until is None
