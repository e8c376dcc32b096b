"""Owner payouts through Connect: onboarding, weekly settlement with a minimum and a holdback, one
transfer group per run, lost answers retried without a second transfer, refusals and reversals booked."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from billing import payouts, stripe_api
from billing.errors import BillingError
from billing.models import LedgerAccount, LedgerTransaction, Payout, SettlementRun
from billing.selectors import account_balance_minor, unbalanced_transaction_ids
from billing.services import Posting, account_get, ledger_post
from tests.factories import OwnerFactory

pytestmark = pytest.mark.django_db


def earn(owner, amount_minor, *, days_ago=30):
    """Book earnings for an owner (as usage would) and date them."""
    txn = ledger_post(kind=LedgerTransaction.Kind.USAGE, description="usage", currency="usd", postings=[
        Posting(account_get(kind="owner", currency="usd", owner=owner), amount_minor),
        Posting(account_get(kind="platform_fee", currency="usd"), -amount_minor)])
    with connection.cursor() as cursor:  # created_at is auto_now_add and the row is append-only
        cursor.execute("UPDATE billing_ledgertransaction SET created_at = %s WHERE id = %s",
                       [timezone.now() - timedelta(days=days_ago), txn.pk])
    return txn


def owner_balance(owner):
    return account_balance_minor(account=LedgerAccount.objects.get(kind="owner", owner=owner))


@pytest.fixture
def onboarded(stripe_peer):
    def make():
        owner = OwnerFactory()
        url = payouts.onboarding_link_create(owner=owner, refresh_url="http://t/r", return_url="http://t/d")
        assert "/onboarding/" in url
        account = owner.connected_account
        payouts.connected_account_sync(account=account, stripe_account=stripe_peer.onboard(account.stripe_account_id))
        return owner
    return make


def test_settlement_pays_each_payable_owner_one_transfer_in_one_group_respecting_minimum_and_holdback(
        stripe_peer, onboarded, settings):
    settings.STRIPE_MIN_PAYOUT_MINOR, settings.STRIPE_PAYOUT_HOLDBACK_DAYS = 1000, 7
    rich, poor, recent = onboarded(), onboarded(), onboarded()
    not_onboarded = OwnerFactory()
    payouts.connected_account_ensure(owner=not_onboarded)
    earn(rich, 2500)
    earn(rich, 800, days_ago=1)           # within the holdback: waits
    earn(poor, 999)                       # below the minimum: waits
    earn(recent, 5000, days_ago=2)        # all within the holdback
    earn(not_onboarded, 5000)             # cannot receive transfers yet
    run = payouts.settlement_run()
    assert list(run.payouts.values_list("owner", "amount_minor", "status")) == [(rich.pk, 2500, "sent")]
    transfers = stripe_peer.objects("transfers", transfer_group=run.transfer_group)
    assert [(t["amount"], t["destination"]) for t in transfers] == [(2500, rich.connected_account.stripe_account_id)]
    assert owner_balance(rich) == 800 and owner_balance(poor) == 999 and owner_balance(not_onboarded) == 5000
    # a second call in the same week sends nothing more
    assert payouts.settlement_run() == run and len(stripe_peer.objects("transfers")) == 1
    assert unbalanced_transaction_ids() == []


def test_a_lost_transfer_answer_then_retries_make_exactly_one_transfer(stripe_peer, onboarded):
    owner = onboarded()
    earn(owner, 4000)
    stripe_peer.network.lose_next("POST", "/v1/transfers")
    run = payouts.settlement_run()
    payout = run.payouts.get()
    assert payout.status == Payout.Status.PENDING and owner_balance(owner) == 0  # booked, outcome unknown
    payouts.settlement_run()                 # the hourly retry
    payouts.payout_send(payout=Payout.objects.get())
    payout.refresh_from_db()
    assert payout.status == Payout.Status.SENT
    assert len(stripe_peer.objects("transfers", transfer_group=run.transfer_group)) == 1
    assert owner_balance(owner) == 0 and unbalanced_transaction_ids() == []


def test_a_refused_transfer_is_booked_back_to_the_owner(stripe_peer, onboarded, monkeypatch):
    owner = onboarded()
    earn(owner, 4000)

    def refuse(**kwargs):
        raise stripe_api.StripeRefused("no")

    monkeypatch.setattr(stripe_api, "transfer_create", refuse)
    payout = payouts.settlement_run().payouts.get()
    assert payout.status == Payout.Status.FAILED and owner_balance(owner) == 4000
    assert LedgerTransaction.objects.filter(kind="payout_reversal").count() == 1
    assert unbalanced_transaction_ids() == []


def test_a_payout_reversal_is_checked_by_us_booked_and_made_once(stripe_peer, onboarded):
    owner = onboarded()
    earn(owner, 3000)
    payout = payouts.settlement_run().payouts.get()
    with pytest.raises(BillingError):
        payouts.payout_reverse(payout=payout, amount_minor=3001, reason="too much")
    stripe_peer.network.lose_next("POST", "/reversals")
    with pytest.raises(stripe_api.StripeUnavailable):
        payouts.payout_reverse(payout=payout, amount_minor=1000, reason="wrong account")
    reversal = payout.reversals.get()
    payouts.payout_reversal_send(reversal=reversal)
    payouts.payout_reversal_send(reversal=payout.reversals.get())
    transfer = stripe_peer.get(f"/v1/transfers/{payout.transfer_id}")
    assert transfer["amount_reversed"] == 1000 and len(transfer["reversals"]["data"]) == 1
    assert owner_balance(owner) == 1000 and Payout.objects.get().reversed_minor == 1000
    assert unbalanced_transaction_ids() == []


def test_each_week_is_one_run_with_its_own_transfer_group(stripe_peer, onboarded, settings):
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS = 0
    owner = onboarded()
    earn(owner, 1500)
    now = timezone.now()
    first = payouts.settlement_run(now=now)
    earn(owner, 1700)
    second = payouts.settlement_run(now=now + timedelta(days=7))
    assert first.transfer_group != second.transfer_group and SettlementRun.objects.count() == 2
    assert [p.amount_minor for p in Payout.objects.order_by("pk")] == [1500, 1700]


def test_no_run_is_made_while_nobody_is_payable_and_the_periodic_task_runs_the_service(stripe_peer, onboarded, settings):
    from billing.tasks import settlement_run as task

    settings.STRIPE_PAYOUT_HOLDBACK_DAYS = 0
    owner = onboarded()
    assert task.apply().get() == "" and not SettlementRun.objects.exists()
    earn(owner, 1200)
    assert task.apply().get() == payouts.settlement_run().transfer_group
    assert Payout.objects.get().amount_minor == 1200
    assert "billing-settlement" in settings.CELERY_BEAT_SCHEDULE
