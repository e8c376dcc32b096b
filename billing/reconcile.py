"""Compare the ledger with itself and with Stripe's objects; report every difference.

Read-only towards the ledger and Stripe. :func:`reconciliation_run` (``manage.py billing_reconcile`` and the
operators' "Run reconciliation now" button) stores each run and what it found as a ``ReconciliationRun``."""

import logging
from dataclasses import asdict, dataclass

from django.db import DatabaseError
from django.db.models import F, Sum
from django.utils import timezone

from billing import stripe_api
from billing.errors import BillingError
from billing.models import (ConnectedAccount, Dispute, LedgerAccount, LedgerEntry, LedgerTransaction, Payout,
                            ReconciliationRun, Refund, Reservation, SettlementRun, TopUp)
from billing.selectors import account_balance_minor, unbalanced_transaction_ids


@dataclass(frozen=True)
class Difference:
    subject: str
    what: str
    ours: object
    stripe: object

    def __str__(self):
        return f"{self.subject}: {self.what}: ours={self.ours!r} other={self.stripe!r}"

    def as_json(self) -> dict:
        """JSON-safe (tuples become lists, other objects their text) for ``ReconciliationRun.differences``."""
        def plain(value):
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return str(value)
        return {key: plain(value) for key, value in asdict(self).items()}


def _booked(reference: str, account_kind: str) -> int | None:
    """The amount booked on accounts of ``account_kind`` by the transaction with ``reference`` (None if
    there is no such transaction)."""
    txn = LedgerTransaction.objects.filter(reference=reference).first()
    if txn is None:
        return None
    return LedgerEntry.objects.filter(transaction=txn, account__kind=account_kind).aggregate(
        t=Sum("amount_minor"))["t"] or 0


def _reservation_differences() -> list[Difference]:
    """An organisation's reserved account holds exactly what its jobs' active reservations have left, and a
    released reservation drew no more than it reserved."""
    found = []
    for account in LedgerAccount.objects.filter(kind=LedgerAccount.Kind.BUYER_RESERVED).select_related("organisation"):
        left = sum(r.remaining_minor for r in Reservation.objects.filter(
            organisation=account.organisation, currency=account.currency, status=Reservation.Status.ACTIVE))
        if (held := account_balance_minor(account=account)) != left:
            found.append(Difference(str(account), "reserved balance vs active reservations' rest", held, left))
    for reservation in Reservation.objects.filter(drawn_minor__gt=F("amount_minor")):
        found.append(Difference(f"reservation of job {reservation.job_id}", "drawn", reservation.drawn_minor,
                                f"<= {reservation.amount_minor}"))
    return found


def ledger_differences() -> list[Difference]:
    found = [Difference(f"ledger transaction {pk}", "entries sum", 0, "not zero") for pk in unbalanced_transaction_ids()]
    for account in LedgerAccount.objects.filter(kind__in=[LedgerAccount.Kind.BUYER, LedgerAccount.Kind.OWNER]):
        if (amount := account_balance_minor(account=account)) < 0:
            found.append(Difference(str(account), "balance", amount, ">= 0"))
    found += _reservation_differences()
    for currency in LedgerAccount.objects.filter(kind=LedgerAccount.Kind.STRIPE_CLEARING).values_list("currency", flat=True):
        topped = TopUp.objects.filter(status=TopUp.Status.SUCCEEDED, currency=currency).aggregate(
            t=Sum("amount_minor"), f=Sum("fee_minor"))
        refunded = Refund.objects.filter(top_up__currency=currency).exclude(status=Refund.Status.FAILED).aggregate(
            t=Sum("amount_minor"))["t"] or 0
        disputed = Dispute.objects.filter(top_up__currency=currency).aggregate(t=Sum("amount_minor"))["t"] or 0
        paid = Payout.objects.filter(currency=currency).exclude(status=Payout.Status.FAILED).aggregate(
            t=Sum("amount_minor"))["t"] or 0
        reversed_ = Payout.objects.filter(currency=currency).aggregate(t=Sum("reversed_minor"))["t"] or 0
        expected = -((topped["t"] or 0) - (topped["f"] or 0) - refunded - disputed - paid + reversed_)
        clearing = LedgerAccount.objects.get(kind=LedgerAccount.Kind.STRIPE_CLEARING, currency=currency)
        if (amount := account_balance_minor(account=clearing)) != expected:
            found.append(Difference(f"stripe clearing ({currency})", "balance", amount, expected))
    return found


def top_up_differences(top_up: TopUp) -> list[Difference]:
    subject = f"top-up {top_up.pk}"
    if not top_up.payment_intent_id:
        return [Difference(subject, "payment intent", None, "unknown (create's answer lost)")] \
            if top_up.status != TopUp.Status.FAILED else []
    found = []
    intent = stripe_api.payment_intent_retrieve(top_up.payment_intent_id)
    if intent["amount"] != top_up.amount_minor or intent["currency"] != top_up.currency:
        found.append(Difference(subject, "amount", (top_up.amount_minor, top_up.currency),
                                (intent["amount"], intent["currency"])))
    paid = intent["status"] == "succeeded"
    if paid != (top_up.status == TopUp.Status.SUCCEEDED):
        found.append(Difference(subject, "paid", top_up.status, intent["status"]))
    booked = _booked(f"top_up:{top_up.pk}", LedgerAccount.Kind.BUYER)
    if (booked or 0) != (top_up.amount_minor if top_up.status == TopUp.Status.SUCCEEDED else 0):
        found.append(Difference(subject, "buyer credit in the ledger", booked, top_up.amount_minor))
    if paid:
        stripe_refunds = {r["id"]: r for r in stripe_api.refunds_list(payment_intent=top_up.payment_intent_id)
                          if r.get("status") in ("succeeded", "pending")}
        ours = {r.stripe_refund_id: r for r in top_up.refunds.exclude(status=Refund.Status.FAILED)}
        for refund_id, refund in stripe_refunds.items():
            if refund_id not in ours:
                found.append(Difference(subject, f"refund {refund_id}", None, refund["amount"]))
            elif ours[refund_id].amount_minor != refund["amount"]:
                found.append(Difference(subject, f"refund {refund_id}", ours[refund_id].amount_minor, refund["amount"]))
        for refund_id, refund in ours.items():
            if refund_id not in stripe_refunds:
                found.append(Difference(subject, f"refund {refund_id or refund.pk}", refund.amount_minor, None))
    return found


def payout_differences(payout: Payout) -> list[Difference]:
    subject = f"payout {payout.pk} ({payout.run.transfer_group})"
    found = []
    booked = _booked(f"payout:{payout.pk}", LedgerAccount.Kind.OWNER)
    if booked != -payout.amount_minor:
        found.append(Difference(subject, "owner debit in the ledger", booked, -payout.amount_minor))
    if payout.status == Payout.Status.PENDING:
        found.append(Difference(subject, "transfer", "pending (outcome unknown)", "run settlement to retry"))
    elif payout.status == Payout.Status.SENT:
        transfer = stripe_api.transfer_retrieve(payout.transfer_id)
        for what, ours, theirs in (("amount", payout.amount_minor, transfer["amount"]),
                                   ("currency", payout.currency, transfer["currency"]),
                                   ("destination", payout.account.stripe_account_id, transfer["destination"]),
                                   ("transfer group", payout.run.transfer_group, transfer.get("transfer_group")),
                                   ("reversed", payout.reversed_minor, transfer.get("amount_reversed", 0))):
            if ours != theirs:
                found.append(Difference(subject, what, ours, theirs))
    return found


def run_differences(run: SettlementRun) -> list[Difference]:
    ours = set(run.payouts.exclude(transfer_id=None).values_list("transfer_id", flat=True))
    return [Difference(f"settlement {run.transfer_group}", f"transfer {t['id']}", None, t["amount"])
            for t in stripe_api.transfers_list(transfer_group=run.transfer_group) if t["id"] not in ours]


def account_differences(account: ConnectedAccount) -> list[Difference]:
    data = stripe_api.account_retrieve(account.stripe_account_id)
    active = (data.get("capabilities") or {}).get("transfers") == "active"
    if active != account.transfers_active:
        return [Difference(f"connected account of owner {account.owner_id}", "transfers active",
                           account.transfers_active, active)]
    return []


def reconcile() -> list[Difference]:
    found = ledger_differences()
    for top_up in TopUp.objects.order_by("pk"):
        found += top_up_differences(top_up)
    for payout in Payout.objects.select_related("run", "account").order_by("pk"):
        found += payout_differences(payout)
    for run in SettlementRun.objects.order_by("pk"):
        found += run_differences(run)
    for account in ConnectedAccount.objects.order_by("pk"):
        found += account_differences(account)
    return found


log = logging.getLogger(__name__)


def reconciliation_run(*, triggered_by=None) -> ReconciliationRun:
    """Run :func:`reconcile` and store the run: its differences, or why it could not finish (Stripe
    unreachable, ...). Never raises for such a failure: the stored run says what happened."""
    run = ReconciliationRun.objects.create(triggered_by=triggered_by)
    try:
        run.differences = [d.as_json() for d in reconcile()]
    except (BillingError, DatabaseError) as error:
        log.warning("reconciliation run %s failed", run.pk, exc_info=True)
        run.error = f"{type(error).__name__}: {error}"[:2000]
    run.finished_at = timezone.now()
    run.save(update_fields=["differences", "error", "finished_at"])
    return run
