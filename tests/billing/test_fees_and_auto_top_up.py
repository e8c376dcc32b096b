"""The operator-set platform fee with its history; automatic top-ups under a threshold."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing import payments, stripe_api
from billing.errors import BillingError
from billing.models import AutoTopUp, LedgerAccount, MeterRecord, TopUp
from billing.selectors import account_balance_minor, platform_fee_bps
from billing.services import platform_fee_set, usage_record
from tests.factories import BuyerFactory

pytestmark = pytest.mark.django_db


def test_the_fee_in_force_is_the_latest_operator_setting_and_each_unit_keeps_the_fee_it_was_booked_with(
        settings, make_job, vehicle):
    assert platform_fee_bps() == settings.PLATFORM_FEE_BPS == 1500
    now = timezone.now()
    platform_fee_set(fee_bps=1000, effective_from=now - timedelta(days=1), note="launch offer")
    platform_fee_set(fee_bps=2000, effective_from=now + timedelta(days=1), note="announced")
    assert platform_fee_bps() == 1000 and platform_fee_bps(at=now + timedelta(days=2)) == 2000
    with pytest.raises(BillingError):
        platform_fee_set(fee_bps=10_001)
    unit = make_job(docs=8).units.get()
    usage_record(unit=unit, vehicle=vehicle, price_micros=10**6, energy_mwh=1)
    assert MeterRecord.objects.get().fee_bps == 1000


def test_an_automatic_top_up_tops_up_once_under_the_threshold_and_stops_on_a_declined_card(stripe_peer, db):
    org = BuyerFactory(organisation__credit=0).organisation
    setup = payments.card_setup_start(organisation=org)
    pm = stripe_peer.post("/v1/payment_methods", {"type": "card", "card": {
        "number": "4242424242424242", "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
    stripe_api.setup_intent_confirm(setup["setup_intent_id"], payment_method=pm["id"])
    card = payments.card_setup_complete(organisation=org, setup_intent_id=setup["setup_intent_id"])
    payments.auto_top_up_set(organisation=org, card=card, threshold_minor=500, amount_minor=2000)
    assert payments.auto_top_ups_run() == 1
    assert payments.auto_top_ups_run() == 0  # 20.00 is above the threshold now
    account = LedgerAccount.objects.get(kind="buyer", organisation=org)
    assert account_balance_minor(account=account) == 2000 and TopUp.objects.count() == 1

    declining = stripe_peer.post("/v1/payment_methods", {"type": "card", "card": {
        "number": "4000000000000341", "exp_month": 12, "exp_year": 2031, "cvc": "123"}})
    card.stripe_payment_method_id = declining["id"]
    card.save()
    payments.refund_create(top_up=TopUp.objects.get(), amount_minor=2000)
    assert payments.auto_top_ups_run() == 1
    assert TopUp.objects.latest("pk").status == TopUp.Status.FAILED and not AutoTopUp.objects.get().enabled
    assert payments.auto_top_ups_run() == 0
