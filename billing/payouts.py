"""Owners' money out through Stripe Connect: Express accounts with onboarding links, the periodic
settlement of each owner's payable balance as one Transfer per owner (all of a run in one
``transfer_group``), a minimum payout, a holdback, and explicit reversals.

Ledger (positive credits an account; see docs/billing.md):
- payout of A:            owner -A, stripe_clearing +A (booked before the Transfer is asked for)
- payout refused:         owner +A, stripe_clearing -A (explicit reversal transaction)
- payout reversal of A:   owner +A, stripe_clearing -A (money back from the connected account; the owner
                          is owed it again unless an operator decides otherwise)
"""

from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from billing import stripe_api
from billing.errors import BillingError
from billing.models import (ConnectedAccount, LedgerAccount, LedgerEntry, LedgerTransaction, Payout,
                            PayoutReversal, SettlementRun)
from billing.selectors import account_balance_minor
from billing.services import AlreadyClaimed, Posting, account_get, accounts_lock, ledger_post, stripe_claim


# --- Connected accounts ---------------------------------------------------------------------------------

def connected_account_ensure(*, owner) -> ConnectedAccount:
    existing = ConnectedAccount.objects.filter(owner=owner).first()
    if existing:
        return existing
    account = stripe_api.account_create(key=f"account:owner:{owner.pk}", email=owner.email or "",
                                        metadata={"owner_id": str(owner.pk)})
    return ConnectedAccount.objects.get_or_create(owner=owner, defaults={"stripe_account_id": account["id"]})[0]


def onboarding_link_create(*, owner, refresh_url: str, return_url: str) -> str:
    """The URL of Stripe's hosted onboarding for the owner's Express account (created on first use)."""
    account = connected_account_ensure(owner=owner)
    return stripe_api.account_link_create(account=account.stripe_account_id, refresh_url=refresh_url,
                                          return_url=return_url)["url"]


def connected_account_sync(*, account: ConnectedAccount, stripe_account: dict | None = None) -> ConnectedAccount:
    """Copy the account's onboarding state from Stripe (from an ``account.updated`` event, or fetched)."""
    data = stripe_account or stripe_api.account_retrieve(account.stripe_account_id)
    account.details_submitted = bool(data.get("details_submitted"))
    account.payouts_enabled = bool(data.get("payouts_enabled"))
    account.transfers_active = (data.get("capabilities") or {}).get("transfers") == "active"
    account.save(update_fields=["details_submitted", "payouts_enabled", "transfers_active", "updated_at"])
    return account


# --- Settlement -----------------------------------------------------------------------------------------

def owner_payable_minor(*, account: LedgerAccount, now, holdback_days: int) -> int:
    """What may be paid to an owner now: the payable balance less the holdback, i.e. less what the owner
    earned in the last ``holdback_days`` days (so a refund or dispute of recent work still finds money)."""
    balance = account_balance_minor(account=account)
    recent = LedgerEntry.objects.filter(
        account=account, transaction__kind=LedgerTransaction.Kind.USAGE,
        transaction__created_at__gte=now - timedelta(days=holdback_days)).aggregate(total=Sum("amount_minor"))["total"]
    return max(0, balance - max(0, recent or 0))


def payout_due(*, connected: ConnectedAccount | None, payable_minor: int, min_payout_minor: int) -> bool:
    """Whether a settlement pays an owner: Stripe can transfer to them and what the holdback lets go reaches
    the minimum payout. (The earnings pages explain the same rule to owners and operators.)"""
    return bool(connected and connected.can_receive_transfers and payable_minor >= min_payout_minor)


def settlement_key(now) -> str:
    year, week, _ = now.isocalendar()
    return f"{year}-W{week:02d}"


def settlement_run(*, now=None, currency: str | None = None) -> SettlementRun | None:
    """This week's settlement: at most one run per ISO week, made by the first call of the week that finds
    an owner to pay (a later call in the week only retries transfers still pending). Every owner whose
    payable balance after the holdback reaches the minimum and whose connected account can receive
    transfers gets one Payout, booked in the ledger before its Transfer is sent. Returns the week's run, or
    None if there is none (nobody to pay yet)."""
    now = now or timezone.now()
    currency = currency or settings.CURRENCY
    key = settlement_key(now)
    run = SettlementRun.objects.filter(key=key).first()
    if run is None:
        try:
            with transaction.atomic():
                run = SettlementRun.objects.create(
                    key=key, currency=currency, transfer_group=f"settlement-{key}",
                    holdback_days=settings.STRIPE_PAYOUT_HOLDBACK_DAYS,
                    min_payout_minor=settings.STRIPE_MIN_PAYOUT_MINOR)
                if not _payouts_book(run=run, now=now):
                    transaction.set_rollback(True)  # nobody to pay: no run this hour
                    return None
        except IntegrityError:  # another worker started this week's run at the same moment
            run = SettlementRun.objects.get(key=key)
    for payout in run.payouts.filter(status=Payout.Status.PENDING).order_by("pk"):
        try:
            payout_send(payout=payout)
        except (stripe_api.StripeUnavailable, AlreadyClaimed):
            pass  # stays pending; the next hourly call retries it with the same key
    return run


def _payouts_book(*, run: SettlementRun, now) -> int:
    booked = 0
    accounts = LedgerAccount.objects.filter(kind=LedgerAccount.Kind.OWNER, currency=run.currency,
                                            owner__connected_account__isnull=False).select_related("owner")
    for ledger_account in accounts.order_by("pk"):
        connected = ledger_account.owner.connected_account
        owner_account, clearing = accounts_lock(
            ledger_account, account_get(kind=LedgerAccount.Kind.STRIPE_CLEARING, currency=run.currency))
        amount = owner_payable_minor(account=owner_account, now=now, holdback_days=run.holdback_days)
        if not payout_due(connected=connected, payable_minor=amount, min_payout_minor=run.min_payout_minor):
            continue
        payout = Payout.objects.create(run=run, owner=ledger_account.owner, account=connected, amount_minor=amount,
                                       currency=run.currency)
        ledger_post(kind=LedgerTransaction.Kind.PAYOUT, currency=run.currency, reference=f"payout:{payout.pk}",
                    description=f"Payout {payout.pk} to {ledger_account.owner} ({run.transfer_group})",
                    postings=[Posting(owner_account, -amount), Posting(clearing, amount)])
        booked += 1
    return booked


def payout_send(*, payout: Payout) -> Payout:
    """Send the payout's Transfer. After an unknown outcome (a timeout), the run's transfer group is searched
    for a transfer carrying this payout's id before anything is sent again: never two transfers."""
    if payout.status != Payout.Status.PENDING:
        return payout
    run = payout.run
    with stripe_claim(payout):
        mine = [t for t in stripe_api.transfers_list(transfer_group=run.transfer_group)
                if (t.get("metadata") or {}).get("payout_id") == str(payout.pk)]
        if mine:
            return payout_sent(payout=payout, transfer_id=mine[-1]["id"])
        try:
            transfer = stripe_api.transfer_create(
                key=f"payout:{payout.pk}", amount=payout.amount_minor, currency=payout.currency,
                destination=payout.account.stripe_account_id, transfer_group=run.transfer_group,
                metadata={"payout_id": str(payout.pk), "owner_id": str(payout.owner_id)})
        except stripe_api.StripeRefused as refused:
            return payout_failed(payout=payout, message=refused.message)
        return payout_sent(payout=payout, transfer_id=transfer["id"])


def payout_sent(*, payout: Payout, transfer_id: str) -> Payout:
    with transaction.atomic():
        payout = Payout.objects.select_for_update().get(pk=payout.pk)
        if payout.status == Payout.Status.PENDING:
            payout.status, payout.transfer_id = Payout.Status.SENT, transfer_id
            payout.save(update_fields=["status", "transfer_id", "updated_at"])
        return payout


def payout_failed(*, payout: Payout, message: str) -> Payout:
    """Stripe refused the transfer: book the amount back to the owner (explicit reversal)."""
    with transaction.atomic():
        payout = Payout.objects.select_for_update().get(pk=payout.pk)
        if payout.status != Payout.Status.PENDING:
            return payout
        owner_account, clearing = accounts_lock(
            account_get(kind=LedgerAccount.Kind.OWNER, currency=payout.currency, owner=payout.owner),
            account_get(kind=LedgerAccount.Kind.STRIPE_CLEARING, currency=payout.currency))
        ledger_post(kind=LedgerTransaction.Kind.PAYOUT_REVERSAL, currency=payout.currency,
                    reference=f"payout:{payout.pk}:failed", description=f"Payout {payout.pk} refused by Stripe",
                    postings=[Posting(owner_account, payout.amount_minor), Posting(clearing, -payout.amount_minor)])
        payout.status, payout.failure_message = Payout.Status.FAILED, (message or "")[:200]
        payout.save(update_fields=["status", "failure_message", "updated_at"])
        return payout


def payout_reverse(*, payout: Payout, amount_minor: int, reason: str) -> PayoutReversal:
    """Take (part of) a sent payout back from the owner's connected account (an operator's decision, e.g.
    a payout to the wrong account). Checked here, not left to Stripe: at most what is left unreversed."""
    with transaction.atomic():
        payout = Payout.objects.select_for_update().get(pk=payout.pk)
        if payout.status != Payout.Status.SENT or not 0 < amount_minor <= payout.amount_minor - payout.reversed_minor:
            raise BillingError("This payout cannot be reversed by that amount.", code="reversal_too_large",
                               extra={"reversible_minor": payout.amount_minor - payout.reversed_minor
                                      if payout.status == Payout.Status.SENT else 0})
        reversal = PayoutReversal.objects.create(payout=payout, amount_minor=amount_minor, reason=reason[:200])
        payout.reversed_minor += amount_minor
        payout.save(update_fields=["reversed_minor", "updated_at"])
    return payout_reversal_send(reversal=reversal)


def payout_reversal_send(*, reversal: PayoutReversal) -> PayoutReversal:
    """Ask Stripe for the reversal (after an unknown outcome, adopt the one already made for it), then
    book it. If Stripe refuses, the reversal is withdrawn and nothing is booked."""
    if reversal.stripe_reversal_id:
        return reversal
    with stripe_claim(reversal):
        return _payout_reversal_send(reversal)


def _payout_reversal_send(reversal: PayoutReversal) -> PayoutReversal:
    payout = reversal.payout
    transfer = stripe_api.transfer_retrieve(payout.transfer_id)
    mine = [r for r in (transfer.get("reversals") or {}).get("data", [])
            if (r.get("metadata") or {}).get("payout_reversal_id") == str(reversal.pk)]
    if mine:
        result = mine[0]
    else:
        try:
            result = stripe_api.transfer_reversal_create(
                key=f"payout_reversal:{reversal.pk}", transfer_id=payout.transfer_id, amount=reversal.amount_minor,
                metadata={"payout_reversal_id": str(reversal.pk)})
        except stripe_api.StripeRefused:
            with transaction.atomic():
                payout = Payout.objects.select_for_update().get(pk=payout.pk)
                payout.reversed_minor -= reversal.amount_minor
                payout.save(update_fields=["reversed_minor", "updated_at"])
                reversal.delete()
            raise
    with transaction.atomic():
        reversal = PayoutReversal.objects.select_for_update().get(pk=reversal.pk)
        if reversal.stripe_reversal_id:
            return reversal
        owner_account, clearing = accounts_lock(
            account_get(kind=LedgerAccount.Kind.OWNER, currency=payout.currency, owner=payout.owner),
            account_get(kind=LedgerAccount.Kind.STRIPE_CLEARING, currency=payout.currency))
        ledger_post(kind=LedgerTransaction.Kind.PAYOUT_REVERSAL, currency=payout.currency,
                    reference=f"payout_reversal:{reversal.pk}",
                    description=f"Payout {payout.pk} reversed: {reversal.reason}"[:200],
                    postings=[Posting(owner_account, reversal.amount_minor),
                              Posting(clearing, -reversal.amount_minor)])
        reversal.stripe_reversal_id = result["id"]
        reversal.save(update_fields=["stripe_reversal_id"])
        return reversal
