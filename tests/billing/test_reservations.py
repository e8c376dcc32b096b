"""Buyers pay in advance: a job reserves its budget from the balance when it is created, completed units draw
from the reservation, a change of bid or cap resizes it, and cancellation or completion releases the rest at
once."""

import pytest

from billing.errors import BillingError
from billing.models import LedgerAccount, Reservation
from billing.money import femto_per_minor
from billing.selectors import account_balance_minor, job_spend_minor, unbalanced_transaction_ids
from billing.services import reservation_remaining_minor, usage_record
from marketplace import flows
from marketplace.models import Job
from tests.factories import BuyerFactory

pytestmark = pytest.mark.django_db
PER_MINOR = femto_per_minor("usd")


def balance(organisation):
    return account_balance_minor(account=LedgerAccount.objects.get(kind="buyer", organisation=organisation))


@pytest.fixture
def buyer():
    return BuyerFactory(organisation__credit=1000)  # $10.00


def test_a_job_reserves_its_cap_draws_from_it_never_beyond_and_the_rest_is_released_at_once(buyer, make_job, vehicle):
    org = buyer.organisation
    # a job whose cap the balance cannot cover is not created, and nothing is booked
    with pytest.raises(BillingError) as too_much:
        make_job(docs=8 * 4, budget_cap=1001)
    assert too_much.value.code == "insufficient_balance" and too_much.value.status == 402
    assert too_much.value.extra == {"balance_minor": 1000, "needed_minor": 1001}
    assert not Job.objects.exists() and balance(org) == 1000
    # a cap of $6.00 is reserved when the job is created
    job = make_job(docs=8 * 4, budget_cap=600)
    units = list(job.units.order_by("seq"))
    assert balance(org) == 400 and reservation_remaining_minor(job=job) == 600
    # two units at about 2.50 each draw from the reservation, not from the balance
    for unit in units[:2]:
        usage_record(unit=unit, vehicle=vehicle, price_micros=250 * PER_MINOR // unit.mops, energy_mwh=1)
    spent = job_spend_minor(job=job)
    assert spent == 500 and reservation_remaining_minor(job=job) == 100 and balance(org) == 400
    # a third would exceed the reservation: refused, nothing booked
    with pytest.raises(BillingError) as exhausted:
        usage_record(unit=units[2], vehicle=vehicle, price_micros=250 * PER_MINOR // units[2].mops, energy_mwh=1)
    assert exhausted.value.code == "reservation_exhausted" and reservation_remaining_minor(job=job) == 100
    # cancelling releases the rest at once, once; a late unit is refused
    flows.job_cancel(job=job)
    flows.job_cancel(job=job)
    assert balance(org) == 1000 - spent and Reservation.objects.get().released_minor == 100
    with pytest.raises(BillingError):
        usage_record(unit=units[3], vehicle=vehicle, price_micros=1, energy_mwh=1)
    assert unbalanced_transaction_ids() == []


def test_a_job_pays_its_exact_cost_rounded_up_once_not_a_cent_per_unit(buyer, make_job, vehicle):
    job = make_job(docs=8 * 10, budget_cap=900)
    for unit in job.units.all():  # ten units of 0.4 cent each: 4 cents in all, not 10
        usage_record(unit=unit, vehicle=vehicle, price_micros=4 * PER_MINOR // (10 * unit.mops), energy_mwh=1)
    reservation = Reservation.objects.get(job=job)
    assert job_spend_minor(job=job) == reservation.drawn_minor == -(-reservation.charged_femto // PER_MINOR) == 4


def test_without_a_cap_a_job_reserves_its_work_at_the_bid_and_a_bid_change_resizes_it(buyer, make_job):
    org = buyer.organisation
    job = make_job(docs=8 * 4, price=10**10)
    cost = -(-job.mops_total * 10**10 // PER_MINOR)
    assert Reservation.objects.get(job=job).amount_minor == cost and balance(org) == 1000 - cost
    # lowering the bid returns money at once; raising it past the balance is refused and changes nothing
    flows.job_bid_update(job=job, max_price_micros=5 * 10**9)
    lower = -(-job.mops_total * 5 * 10**9 // PER_MINOR)
    assert Reservation.objects.get(job=job).amount_minor == lower and balance(org) == 1000 - lower
    with pytest.raises(BillingError) as refused:
        flows.job_bid_update(job=job, max_price_micros=10**12)
    assert refused.value.code == "insufficient_balance"
    job.refresh_from_db()
    assert job.max_price_micros == 5 * 10**9 and Reservation.objects.get(job=job).amount_minor == lower
    # a cap replaces it: the reservation becomes the cap; removing the cap goes back to the work at the bid
    flows.job_budget_update(job=job, budget_cap_minor=50)
    assert Reservation.objects.get(job=job).amount_minor == 50 and balance(org) == 950
    flows.job_budget_update(job=job, budget_cap_minor=None)
    assert Reservation.objects.get(job=job).amount_minor == lower
    assert unbalanced_transaction_ids() == []


def test_a_cap_lowered_below_what_was_spent_keeps_that_much_reserved(buyer, make_job, vehicle):
    job = make_job(docs=8 * 4, budget_cap=600)
    unit = job.units.first()
    usage_record(unit=unit, vehicle=vehicle, price_micros=300 * PER_MINOR // unit.mops, energy_mwh=1)
    flows.job_budget_update(job=job, budget_cap_minor=1)
    reservation = Reservation.objects.get(job=job)
    assert reservation.amount_minor == reservation.drawn_minor == 300 and reservation.remaining_minor == 0
    assert balance(buyer.organisation) == 700


def test_an_operator_grants_credit_once_per_reference_and_bad_amounts_are_refused(buyer):
    from django.core.management import CommandError, call_command

    call_command("billing_grant", buyer.organisation.slug, "12.50", "--note", "goodwill", "--reference", "t-1")
    call_command("billing_grant", buyer.organisation.slug, "12.50", "--note", "goodwill", "--reference", "t-1")
    assert balance(buyer.organisation) == 1000 + 1250
    for amount in ("1.234", "-5", "abc", "0"):
        with pytest.raises(CommandError):
            call_command("billing_grant", buyer.organisation.slug, amount, "--note", "x")
    with pytest.raises(CommandError):
        call_command("billing_grant", "no-such-org", "1", "--note", "x")
    call_command("billing_grant", buyer.email, "1", "--note", "by a member's email")
    assert balance(buyer.organisation) == 2350 and unbalanced_transaction_ids() == []
