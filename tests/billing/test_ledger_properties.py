"""Ledger invariants under any interleaving of top-ups, jobs reserving their budgets, unit completions,
cancellations, refunds, disputes and settlements, against the local Stripe peer: every transaction balances, no buyer or owner balance goes
negative, each work unit is paid at most once, and the Stripe clearing account matches the money that
moved through Stripe."""

import itertools
import time
from datetime import timedelta

import pytest
from django.db import IntegrityError
from django.db.models import Sum
from django.utils import timezone
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from billing import payments, payouts, stripe_webhooks
from billing.errors import BillingError
from billing.models import Dispute, LedgerAccount, MeterRecord, Payout, Refund, Reservation, TopUp
from billing.money import femto_per_minor
from billing.selectors import account_balance_minor, job_spend_minor, unbalanced_transaction_ids
from billing.services import usage_record
from fleet.models import WorkUnit
from marketplace import corpus, flows
from marketplace.models import Job
from tests.conftest import SLOW_EXAMPLES, jsonl
from tests.factories import BuyerFactory, VehicleFactory, future

pytestmark = pytest.mark.django_db
_examples = itertools.count(1)

operations = st.lists(st.one_of(
    st.tuples(st.just("top_up"), st.integers(0, 1), st.integers(100, 6000)),
    st.tuples(st.just("use"), st.integers(0, 1), st.integers(0, 1), st.integers(1, 3000), st.booleans()),
    st.tuples(st.just("refund"), st.integers(0, 1), st.integers(0, 3), st.integers(1, 7000)),
    st.tuples(st.just("dispute"), st.integers(0, 1), st.integers(0, 3), st.integers(1, 7000)),
    st.tuples(st.just("settle")),
    st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(1, 6000)),
    st.tuples(st.just("release"), st.integers(0, 1)),
), min_size=1, max_size=14)


def balance(account):
    return account_balance_minor(account=account)


def check_invariants():
    assert unbalanced_transaction_ids() == []
    for account in LedgerAccount.objects.filter(kind__in=["buyer", "buyer_reserved", "owner"]):
        assert balance(account) >= 0, account
    assert MeterRecord.objects.values("unit").distinct().count() == MeterRecord.objects.count()
    topped = TopUp.objects.filter(status="succeeded").aggregate(t=Sum("amount_minor"), f=Sum("fee_minor"))
    refunded = Refund.objects.exclude(status="failed").aggregate(t=Sum("amount_minor"))["t"] or 0
    disputed = Dispute.objects.aggregate(t=Sum("amount_minor"))["t"] or 0
    paid_out = Payout.objects.exclude(status="failed").aggregate(t=Sum("amount_minor"))["t"] or 0
    clearing = LedgerAccount.objects.filter(kind="stripe_clearing").first()
    expected = -((topped["t"] or 0) - (topped["f"] or 0) - refunded - disputed - paid_out)
    assert (balance(clearing) if clearing else 0) == expected
    for reservation in Reservation.objects.all():  # a job never spends beyond its reservation
        assert 0 <= reservation.drawn_minor <= reservation.amount_minor - reservation.released_minor
        assert reservation.drawn_minor == job_spend_minor(job=reservation.job)


@hsettings(SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(ops=operations)
def test_any_interleaving_keeps_the_ledger_balanced_non_negative_and_each_unit_paid_once(ops, stripe_peer, settings):
    settings.STRIPE_MIN_PAYOUT_MINOR, settings.STRIPE_PAYOUT_HOLDBACK_DAYS = 1, 0
    stripe_peer.flush()
    example = next(_examples)
    buyers = [BuyerFactory(organisation__credit=0), BuyerFactory(organisation__credit=0)]
    cars = [VehicleFactory(), VehicleFactory()]
    for car in cars:
        account = payouts.connected_account_ensure(owner=car.owner)
        payouts.connected_account_sync(account=account, stripe_account=stripe_peer.onboard(account.stripe_account_id))
    jobs: list[list] = [[], []]  # each buyer's jobs, with the units not yet completed
    used: list[WorkUnit] = []
    top_ups: list[list[TopUp]] = [[], []]
    week = 0
    for op in ops:
        kind = op[0]
        if kind == "top_up":
            _, b, amount = op
            top_ups[b].append(payments.top_up_create(organisation=buyers[b].organisation, amount_minor=amount,
                                                     payment_method_id="pm_card_visa"))
        elif kind == "use":
            _, b, c, cents, repeat = op
            if repeat and used:  # completing an already-paid unit again is refused by the database
                with pytest.raises(IntegrityError):
                    usage_record(unit=used[-1], vehicle=cars[c], price_micros=1, energy_mwh=1)
                continue
            if not jobs[b] or not jobs[b][-1][1]:
                continue
            job, units = jobs[b][-1]
            unit = units.pop()
            price = cents * femto_per_minor("usd") // unit.mops
            reservation = Reservation.objects.get(job=job)
            # the reservation is the gate: a unit beyond it (or after release) is refused, nothing booked
            if reservation.status == "active" and reservation.remaining_minor >= cents:
                usage_record(unit=unit, vehicle=cars[c], price_micros=price, energy_mwh=1)
                used.append(unit)
            elif reservation.status != "active" or reservation.remaining_minor < cents - 1:
                with pytest.raises(BillingError):
                    usage_record(unit=unit, vehicle=cars[c], price_micros=price, energy_mwh=1)
            else:  # within a cent of the rest: either, by the job's rounding so far
                try:
                    usage_record(unit=unit, vehicle=cars[c], price_micros=price, energy_mwh=1)
                    used.append(unit)
                except BillingError as error:
                    assert error.code == "reservation_exhausted"
        elif kind == "reserve":  # a new job reserves its budget cap from the balance, or is not created
            _, b, amount = op
            before = Job.objects.count()
            try:
                job = flows.job_create(organisation=buyers[b].organisation, user=buyers[b],
                                          model_slug="all-minilm-l6-v2", precision="int8", max_price_micros=10**12,
                                          deadline=future(), budget_cap_minor=amount,
                                          inputs=jsonl(corpus.documents(8 * 4)).splitlines(keepends=True))
            except BillingError as error:
                assert error.code == "insufficient_balance" and Job.objects.count() == before
            else:
                jobs[b].append((job, list(WorkUnit.objects.filter(job=job).order_by("seq"))))
        elif kind == "release":  # cancelling the buyer's latest job releases the rest of its budget at once
            if jobs[op[1]]:
                flows.job_cancel(job=jobs[op[1]][-1][0])
                assert Reservation.objects.get(job=jobs[op[1]][-1][0]).status == "released"
        elif kind in ("refund", "dispute"):
            _, b, i, amount = op
            if not top_ups[b]:
                continue
            top_up = TopUp.objects.get(pk=top_ups[b][i % len(top_ups[b])].pk)
            if kind == "refund":
                try:
                    payments.refund_create(top_up=top_up, amount_minor=amount)
                except BillingError as error:
                    assert error.code == "refund_too_large"
            else:
                stripe_webhooks.event_process(event={
                    "id": f"evt_{example}_{time.monotonic_ns()}", "type": "charge.dispute.created",
                    "data": {"object": {"id": f"dp_{example}_{time.monotonic_ns()}", "object": "dispute",
                                        "amount": amount, "charge": top_up.charge_id,
                                        "payment_intent": top_up.payment_intent_id}}})
        else:
            week += 1
            payouts.settlement_run(now=timezone.now() + timedelta(weeks=100 * example + week))
        check_invariants()
