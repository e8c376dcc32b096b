"""The ledger: balanced, append-only, nothing lost to rounding."""

import pytest
from django.db import IntegrityError
from hypothesis import given, settings, strategies as st
from hypothesis.extra.django import TestCase as HypothesisTestCase

from billing.errors import BillingError
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, MeterRecord, Reservation
from billing.money import femto_per_minor, split_revenue
from billing.selectors import account_balance_minor, job_spend_minor, unbalanced_transaction_ids
from billing.services import Posting, account_get, ledger_post, usage_record
from fleet.models import WorkUnit
from marketplace import corpus, flows
from tests.conftest import SLOW_EXAMPLES, jsonl
from tests.factories import BuyerFactory, VehicleFactory, future

pytestmark = pytest.mark.django_db


def test_an_unbalanced_transaction_is_refused_and_nothing_is_written():
    a = account_get(kind="platform_fee", currency="usd")
    b = account_get(kind="rounding", currency="usd")
    with pytest.raises(BillingError):
        ledger_post(kind="usage", description="bad", currency="usd", postings=[Posting(a, 5), Posting(b, -4)])
    assert LedgerTransaction.objects.count() == 0 and LedgerEntry.objects.count() == 0


def test_ledger_rows_are_append_only():
    a = account_get(kind="platform_fee", currency="usd")
    b = account_get(kind="rounding", currency="usd")
    txn = ledger_post(kind="usage", description="ok", currency="usd", postings=[Posting(a, 5), Posting(b, -5)])
    entry = txn.entries.first()
    entry.amount_minor = 6
    with pytest.raises(TypeError):
        entry.save()
    with pytest.raises(TypeError):
        LedgerEntry.objects.all().update(amount_minor=0)
    with pytest.raises(TypeError):
        txn.delete()


class UsageBookingTests(HypothesisTestCase):
    @settings(SLOW_EXAMPLES, deadline=None)
    @given(prices=st.lists(st.integers(1, 50_000_000), min_size=1, max_size=12))
    def test_the_job_pays_the_round_up_of_its_exact_charge_owners_the_floor_of_their_accrual_each_balanced(self, prices):
        buyer = BuyerFactory()
        car = VehicleFactory()
        job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                                  precision="int8", max_price_micros=10**8, deadline=future(),
                                  inputs=jsonl(corpus.documents(8 * len(prices))).splitlines(keepends=True))
        units = list(WorkUnit.objects.filter(job=job).order_by("seq"))
        for unit, price in zip(units, prices):
            usage_record(unit=unit, vehicle=car, price_micros=price, energy_mwh=1)
        assert unbalanced_transaction_ids() == []
        records = MeterRecord.objects.filter(job=job)
        exact_charge = sum(u.mops * p for u, p in zip(units, prices))
        exact_owner = sum(split_revenue(charge=u.mops * p, fee_bps=1500)[0] for u, p in zip(units, prices))
        per_minor = femto_per_minor("usd")
        owner_account = LedgerAccount.objects.get(kind="owner", owner=car.owner)
        # the buyer pays the job's exact cost rounded up once (never a cent per unit), from its reservation
        assert job_spend_minor(job=job) == Reservation.objects.get(job=job).drawn_minor == -(-exact_charge // per_minor)
        assert Reservation.objects.get(job=job).charged_femto == exact_charge
        assert account_balance_minor(account=owner_account) == exact_owner // per_minor
        assert sum(r.charge_femto for r in records) == exact_charge
        # The owner's sub-cent remainder is kept on the account, not lost.
        assert owner_account.carry_femto == exact_owner % per_minor


def test_a_unit_is_metered_once():
    buyer = BuyerFactory()
    car = VehicleFactory()
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                              precision="int8", max_price_micros=10**6, deadline=future(),
                              inputs=jsonl(corpus.documents(8)).splitlines(keepends=True))
    unit = job.units.get()
    usage_record(unit=unit, vehicle=car, price_micros=10**6, energy_mwh=1)
    with pytest.raises(IntegrityError):
        usage_record(unit=unit, vehicle=car, price_micros=10**6, energy_mwh=1)
