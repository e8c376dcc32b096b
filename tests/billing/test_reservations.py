"""Job budget reservations at the service level: reserved from the balance, drawn by completed units,
never exceeded, released at once."""

import pytest

from billing.errors import BillingError
from billing.models import LedgerAccount, Reservation
from billing.money import femto_per_minor
from billing.selectors import account_balance_minor, job_spend_minor, unbalanced_transaction_ids
from billing.services import (Posting, account_get, ledger_post, reservation_create, reservation_release,
                              reservation_remaining_minor, usage_record)

pytestmark = pytest.mark.django_db


def fund(organisation, amount_minor):
    ledger_post(kind="top_up", description="test funds", currency="usd", postings=[
        Posting(account_get(kind="buyer", currency="usd", organisation=organisation), amount_minor),
        Posting(account_get(kind="stripe_clearing", currency="usd"), -amount_minor)])


def buyer_balance(organisation):
    return account_balance_minor(account=LedgerAccount.objects.get(kind="buyer", organisation=organisation))


def test_a_job_draws_from_its_reservation_never_beyond_and_the_rest_is_released_at_once(buyer, make_job, vehicle):
    fund(buyer.organisation, 1000)
    job = make_job(docs=8 * 4)
    units = list(job.units.order_by("seq"))
    with pytest.raises(BillingError) as too_much:
        reservation_create(job=job, amount_minor=1001)
    assert too_much.value.code == "insufficient_balance"
    reservation_create(job=job, amount_minor=600)
    assert buyer_balance(buyer.organisation) == 400 and reservation_remaining_minor(job=job) == 600
    # two units at about 2.50 each draw from the reservation, not from the balance
    for unit in units[:2]:
        usage_record(unit=unit, vehicle=vehicle, price_micros=250 * femto_per_minor("usd") // unit.mops, energy_mwh=1)
    spent = job_spend_minor(job=job)
    assert 498 <= spent <= 500 and reservation_remaining_minor(job=job) == 600 - spent
    assert buyer_balance(buyer.organisation) == 400
    # a third would exceed the reservation: refused, nothing booked
    with pytest.raises(BillingError) as exhausted:
        usage_record(unit=units[2], vehicle=vehicle, price_micros=250 * femto_per_minor("usd") // units[2].mops,
                     energy_mwh=1)
    assert exhausted.value.code == "reservation_exhausted" and reservation_remaining_minor(job=job) == 600 - spent
    # release returns the rest at once, once
    reservation_release(job=job)
    reservation_release(job=job)
    assert buyer_balance(buyer.organisation) == 1000 - spent and Reservation.objects.get().released_minor == 600 - spent
    with pytest.raises(BillingError):
        usage_record(unit=units[3], vehicle=vehicle, price_micros=1, energy_mwh=1)
    assert unbalanced_transaction_ids() == []
