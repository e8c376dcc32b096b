"""Buyers' money in: balance top-ups by card (PaymentIntent), saved cards (SetupIntent), refunds of
unspent balance and card disputes. Every effect on the ledger is booked once (a unique ``reference`` per
ledger transaction and row locks), whichever path (our own call, a webhook, a retry) gets there first.

Ledger (positive credits an account; see docs/billing.md):
- top-up of G with Stripe fee F: buyer +G, stripe_clearing -(G-F), stripe_fees -F
- refund of R:                   buyer -R, stripe_clearing +R
- dispute of D:                  buyer -min(D, balance), dispute_losses -(the rest), stripe_clearing +D
"""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing import stripe_api
from billing.errors import BillingError
from billing.models import (AutoTopUp, Dispute, LedgerAccount, LedgerTransaction, Refund, SavedCard,
                            StripeCustomer, StripeRequest, TopUp)
from billing.selectors import account_balance_minor
from billing.services import AlreadyClaimed, Posting, account_get, accounts_lock, ledger_post, stripe_claim

MIN_TOP_UP_MINOR = 100
MAX_TOP_UP_MINOR = 10_000_000


def _buyer_account(organisation, currency: str) -> LedgerAccount:
    return account_get(kind=LedgerAccount.Kind.BUYER, currency=currency, organisation=organisation)


def _platform_account(kind: str, currency: str) -> LedgerAccount:
    return account_get(kind=kind, currency=currency)


def customer_ensure(*, organisation) -> StripeCustomer:
    """The organisation's Stripe customer, created once (the key makes a retry return the same one)."""
    existing = StripeCustomer.objects.filter(organisation=organisation).first()
    if existing:
        return existing
    customer = stripe_api.customer_create(key=f"customer:organisation:{organisation.pk}", name=organisation.name,
                                          metadata={"organisation_id": str(organisation.pk)})
    return StripeCustomer.objects.get_or_create(organisation=organisation, defaults={"stripe_id": customer["id"]})[0]


# --- Saved cards ----------------------------------------------------------------------------------------

def card_setup_start(*, organisation) -> dict:
    """Start saving a card: a SetupIntent whose ``client_secret`` the buyer's browser confirms with
    Stripe.js. Returns ``{"setup_intent_id", "client_secret"}``."""
    customer = customer_ensure(organisation=organisation)
    attempt = StripeRequest.objects.filter(key__startswith=f"setup_intent:organisation:{organisation.pk}:").count()
    intent = stripe_api.setup_intent_create(key=f"setup_intent:organisation:{organisation.pk}:{attempt}",
                                            customer=customer.stripe_id,
                                            metadata={"organisation_id": str(organisation.pk)})
    return {"setup_intent_id": intent["id"], "client_secret": intent["client_secret"]}


def card_add_test_card(*, organisation, number: str, exp_month: int, exp_year: int, cvc: str) -> SavedCard:
    """Save a test card on the local Stripe peer: this server plays the buyer's browser (Stripe.js), which
    creates the card's PaymentMethod and confirms the SetupIntent; then the card is recorded like any other.
    Only on the local peer (``stripe_api`` refuses elsewhere): real card numbers never reach us."""
    method = stripe_api.payment_method_create_test_card(number=number, exp_month=exp_month, exp_year=exp_year, cvc=cvc)
    setup = card_setup_start(organisation=organisation)
    stripe_api.setup_intent_confirm(setup["setup_intent_id"], payment_method=method["id"])
    return card_setup_complete(organisation=organisation, setup_intent_id=setup["setup_intent_id"])


def card_setup_complete(*, organisation, setup_intent_id: str) -> SavedCard:
    """Record the card of a SetupIntent the buyer confirmed; only an intent of this organisation's own
    customer that Stripe reports as succeeded."""
    customer = customer_ensure(organisation=organisation)
    intent = stripe_api.setup_intent_retrieve(setup_intent_id)
    if intent.get("customer") != customer.stripe_id:
        raise BillingError("This card setup belongs to another customer.", code="not_ours")
    if intent.get("status") != "succeeded" or not intent.get("payment_method"):
        raise BillingError("The card has not been confirmed.", code="card_setup_incomplete",
                           extra={"status": intent.get("status")})
    pm_id = intent["payment_method"] if isinstance(intent["payment_method"], str) else intent["payment_method"]["id"]
    card = stripe_api.payment_method_retrieve(pm_id).get("card") or {}
    saved, _ = SavedCard.objects.get_or_create(
        stripe_payment_method_id=pm_id,
        defaults={"organisation": organisation, "setup_intent_id": setup_intent_id, "brand": card.get("brand", ""),
                  "last4": card.get("last4", ""), "exp_month": card.get("exp_month"),
                  "exp_year": card.get("exp_year")})
    if saved.organisation_id != organisation.pk:
        raise BillingError("This card belongs to another organisation.", code="not_ours")
    return saved


# --- Top-ups --------------------------------------------------------------------------------------------

def top_up_create(*, organisation, amount_minor: int, payment_method_id: str, user=None,
                  currency: str | None = None) -> TopUp:
    """Top up the organisation's balance by card and confirm the payment. Returns the top-up, whose status
    says what happened (``succeeded``, ``failed``, ``requires_action``). A transient Stripe failure raises
    :class:`~billing.stripe_api.StripeUnavailable`; :func:`top_up_confirm` on the same top-up (the periodic
    :func:`pending_retry` does it) finishes it without ever charging twice."""
    currency = currency or settings.CURRENCY
    if not MIN_TOP_UP_MINOR <= amount_minor <= MAX_TOP_UP_MINOR:
        raise BillingError("Top-ups are between 1.00 and 100,000.00.", code="invalid_amount",
                           extra={"min_minor": MIN_TOP_UP_MINOR, "max_minor": MAX_TOP_UP_MINOR})
    saved = SavedCard.objects.filter(stripe_payment_method_id=payment_method_id).first()
    if saved and saved.organisation_id != organisation.pk:
        raise BillingError("This card belongs to another organisation.", code="not_ours")
    top_up = TopUp.objects.create(organisation=organisation, created_by=user, amount_minor=amount_minor,
                                  currency=currency, payment_method_id=payment_method_id)
    return top_up_confirm(top_up=top_up)


def top_up_confirm(*, top_up: TopUp) -> TopUp:
    """Create the top-up's PaymentIntent if we have none, confirm it unless Stripe already has it past
    confirmation, then book what Stripe reports. Safe to call again after any failure: the intent is created
    unconfirmed and looked up before it is confirmed, so a confirmation whose answer was lost is never sent
    twice; a claim on the row keeps two workers from confirming at once."""
    if top_up.status == TopUp.Status.SUCCEEDED:
        return top_up
    with stripe_claim(top_up):
        if not top_up.payment_intent_id:
            customer = customer_ensure(organisation=top_up.organisation)
            intent = stripe_api.payment_intent_create(
                key=f"top_up:{top_up.pk}:create", amount=top_up.amount_minor, currency=top_up.currency,
                customer=customer.stripe_id, payment_method=top_up.payment_method_id,
                metadata={"top_up_id": str(top_up.pk), "organisation_id": str(top_up.organisation_id)})
            top_up.payment_intent_id = intent["id"]
            top_up.save(update_fields=["payment_intent_id", "updated_at"])
        intent = stripe_api.payment_intent_retrieve(top_up.payment_intent_id)
        if intent["status"] == "requires_confirmation":
            try:
                intent = stripe_api.payment_intent_confirm(key=f"top_up:{top_up.pk}:confirm",
                                                           payment_intent_id=top_up.payment_intent_id)
            except stripe_api.PaymentDeclined as declined:
                return top_up_failed(top_up=top_up, message=declined.message)
        return top_up_apply(top_up=top_up, intent=intent)


def top_up_apply(*, top_up: TopUp, intent: dict) -> TopUp:
    """Book the state of the top-up's PaymentIntent as Stripe reports it."""
    status = intent.get("status")
    if status == "succeeded":
        charge = intent.get("latest_charge")
        charge_id = charge["id"] if isinstance(charge, dict) else (charge or "")
        return top_up_succeeded(top_up=top_up, charge_id=charge_id)
    if status == "requires_action":
        TopUp.objects.filter(pk=top_up.pk, status=TopUp.Status.CREATED).update(status=TopUp.Status.REQUIRES_ACTION)
    elif status == "requires_payment_method" and intent.get("last_payment_error"):
        return top_up_failed(top_up=top_up, message=(intent["last_payment_error"] or {}).get("message", ""))
    top_up.refresh_from_db()
    return top_up


def _fee_minor(charge_id: str) -> int:
    if not charge_id:
        return 0
    txn = stripe_api.charge_retrieve(charge_id).get("balance_transaction")
    return int(txn.get("fee") or 0) if isinstance(txn, dict) else 0


def top_up_succeeded(*, top_up: TopUp, charge_id: str, fee_minor: int | None = None) -> TopUp:
    """Credit the buyer's balance with the top-up, once. Stripe's fee (read from the charge unless given)
    is the platform's cost."""
    fee = _fee_minor(charge_id) if fee_minor is None else fee_minor  # a read, before any lock is taken
    with transaction.atomic():
        top_up = TopUp.objects.select_for_update().get(pk=top_up.pk)
        if top_up.status == TopUp.Status.SUCCEEDED:
            return top_up
        currency = top_up.currency
        buyer, clearing, fees = accounts_lock(_buyer_account(top_up.organisation, currency),
                                              _platform_account(LedgerAccount.Kind.STRIPE_CLEARING, currency),
                                              _platform_account(LedgerAccount.Kind.STRIPE_FEES, currency))
        ledger_post(kind=LedgerTransaction.Kind.TOP_UP, currency=currency, reference=f"top_up:{top_up.pk}",
                    description=f"Top-up {top_up.pk} ({top_up.payment_intent_id})",
                    postings=[Posting(buyer, top_up.amount_minor), Posting(clearing, -(top_up.amount_minor - fee)),
                              Posting(fees, -fee)])
        top_up.status, top_up.charge_id, top_up.fee_minor, top_up.failure_message = (
            TopUp.Status.SUCCEEDED, charge_id, fee, "")
        top_up.save(update_fields=["status", "charge_id", "fee_minor", "failure_message", "updated_at"])
        return top_up


def top_up_failed(*, top_up: TopUp, message: str) -> TopUp:
    """Mark a top-up failed, unless it already succeeded (a success always wins, in any order)."""
    with transaction.atomic():
        top_up = TopUp.objects.select_for_update().get(pk=top_up.pk)
        if top_up.status != TopUp.Status.SUCCEEDED:
            top_up.status, top_up.failure_message = TopUp.Status.FAILED, (message or "The payment failed.")[:200]
            top_up.save(update_fields=["status", "failure_message", "updated_at"])
        return top_up


# --- Refunds --------------------------------------------------------------------------------------------

def refund_create(*, top_up: TopUp, amount_minor: int, reason: str = "") -> Refund:
    """Refund unspent balance to the card of a top-up. We check everything ourselves (Stripe, and the local
    peer even less, may not refuse an over-refund): the amount is at most what is left of the top-up and at
    most the buyer's balance. The balance is debited before Stripe is asked, so the same money cannot be
    spent meanwhile; if Stripe refuses, the debit is booked back."""
    if amount_minor <= 0:
        raise BillingError("A refund must be positive.", code="invalid_amount")
    with transaction.atomic():
        top_up = TopUp.objects.select_for_update().get(pk=top_up.pk)
        currency = top_up.currency
        buyer, clearing = accounts_lock(_buyer_account(top_up.organisation, currency),
                                        _platform_account(LedgerAccount.Kind.STRIPE_CLEARING, currency))
        balance = account_balance_minor(account=buyer)
        if amount_minor > top_up.refundable_minor or amount_minor > balance:
            raise BillingError("The refund exceeds what can be refunded.", code="refund_too_large",
                               extra={"refundable_minor": top_up.refundable_minor, "balance_minor": balance})
        refund = Refund.objects.create(top_up=top_up, amount_minor=amount_minor, reason=reason[:200])
        ledger_post(kind=LedgerTransaction.Kind.REFUND, currency=currency, reference=f"refund:{refund.pk}",
                    description=f"Refund {refund.pk} of top-up {top_up.pk}",
                    postings=[Posting(buyer, -amount_minor), Posting(clearing, amount_minor)])
        top_up.refunded_minor += amount_minor
        top_up.save(update_fields=["refunded_minor", "updated_at"])
    return refund_send(refund=refund)


def refund_send(*, refund: Refund) -> Refund:
    """Ask Stripe for the refund; after an unknown outcome, adopt the refund Stripe already made for it."""
    if refund.status != Refund.Status.PENDING:
        return refund
    top_up = refund.top_up
    with stripe_claim(refund):
        existing = [r for r in stripe_api.refunds_list(payment_intent=top_up.payment_intent_id)
                    if (r.get("metadata") or {}).get("refund_id") == str(refund.pk)]
        if existing:
            stripe_refund = existing[0]
        else:
            try:
                stripe_refund = stripe_api.refund_create(
                    key=f"refund:{refund.pk}", payment_intent=top_up.payment_intent_id, amount=refund.amount_minor,
                    metadata={"refund_id": str(refund.pk), "top_up_id": str(top_up.pk)})
            except stripe_api.StripeRefused:
                return refund_failed(refund=refund)
        return refund_succeeded(refund=refund, stripe_refund_id=stripe_refund["id"])


def refund_succeeded(*, refund: Refund, stripe_refund_id: str) -> Refund:
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund.pk)
        if refund.status == Refund.Status.PENDING:
            refund.status, refund.stripe_refund_id = Refund.Status.SUCCEEDED, stripe_refund_id
            refund.save(update_fields=["status", "stripe_refund_id"])
        return refund


def refund_failed(*, refund: Refund) -> Refund:
    """Stripe refused the refund: book the balance back."""
    with transaction.atomic():
        refund = Refund.objects.select_for_update().get(pk=refund.pk)
        if refund.status != Refund.Status.PENDING:
            return refund
        top_up = TopUp.objects.select_for_update().get(pk=refund.top_up_id)
        currency = top_up.currency
        buyer, clearing = accounts_lock(_buyer_account(top_up.organisation, currency),
                                        _platform_account(LedgerAccount.Kind.STRIPE_CLEARING, currency))
        ledger_post(kind=LedgerTransaction.Kind.REFUND_REVERSAL, currency=currency,
                    reference=f"refund:{refund.pk}:reversal", description=f"Refund {refund.pk} refused by Stripe",
                    postings=[Posting(buyer, refund.amount_minor), Posting(clearing, -refund.amount_minor)])
        top_up.refunded_minor -= refund.amount_minor
        top_up.save(update_fields=["refunded_minor", "updated_at"])
        refund.status = Refund.Status.FAILED
        refund.save(update_fields=["status"])
        return refund


# --- Disputes -------------------------------------------------------------------------------------------

def dispute_record(*, top_up: TopUp, stripe_dispute_id: str, amount_minor: int, reason: str = "",
                   fee_minor: int | None = None) -> Dispute:
    """A card dispute takes money back from Stripe's balance at once. It is taken from the buyer's balance
    as far as it goes; what was already spent is a platform loss (owners keep what they earned). Once per
    dispute id."""
    if top_up.status != TopUp.Status.SUCCEEDED:
        top_up_succeeded(top_up=top_up, charge_id=top_up.charge_id, fee_minor=fee_minor)  # it did succeed
    with transaction.atomic():
        top_up = TopUp.objects.select_for_update().get(pk=top_up.pk)
        existing = Dispute.objects.filter(stripe_dispute_id=stripe_dispute_id).first()
        if existing:
            return existing
        currency = top_up.currency
        amount = max(0, min(amount_minor, top_up.amount_minor - top_up.refunded_minor - top_up.disputed_minor))
        buyer, clearing, losses = accounts_lock(_buyer_account(top_up.organisation, currency),
                                                _platform_account(LedgerAccount.Kind.STRIPE_CLEARING, currency),
                                                _platform_account(LedgerAccount.Kind.DISPUTE_LOSSES, currency))
        from_balance = max(0, min(amount, account_balance_minor(account=buyer)))
        dispute = Dispute.objects.create(stripe_dispute_id=stripe_dispute_id, top_up=top_up, amount_minor=amount,
                                         from_balance_minor=from_balance, loss_minor=amount - from_balance,
                                         reason=reason[:60])
        ledger_post(kind=LedgerTransaction.Kind.DISPUTE, currency=currency, reference=f"dispute:{stripe_dispute_id}",
                    description=f"Dispute {stripe_dispute_id} on top-up {top_up.pk}",
                    postings=[Posting(buyer, -from_balance), Posting(losses, -(amount - from_balance)),
                              Posting(clearing, amount)])
        top_up.disputed_minor += amount
        top_up.save(update_fields=["disputed_minor", "updated_at"])
        return dispute


def pending_retry(*, older_than_s: int = 60) -> int:
    """Finish what a lost answer left open (periodic): top-ups still ``created`` and refunds still
    ``pending`` after ``older_than_s``. Each retry looks at Stripe before it sends anything. Returns how
    many rows were retried."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    retried = 0
    for top_up in TopUp.objects.filter(status=TopUp.Status.CREATED, created_at__lt=cutoff).order_by("pk")[:100]:
        try:
            top_up_confirm(top_up=top_up)
            retried += 1
        except (stripe_api.StripeUnavailable, AlreadyClaimed):
            continue
    for refund in Refund.objects.filter(status=Refund.Status.PENDING, created_at__lt=cutoff).order_by("pk")[:100]:
        try:
            refund_send(refund=refund)
            retried += 1
        except (stripe_api.StripeUnavailable, AlreadyClaimed):
            continue
    return retried


# --- Automatic top-up -----------------------------------------------------------------------------------

def auto_top_up_set(*, organisation, card: SavedCard, threshold_minor: int, amount_minor: int,
                    enabled: bool = True) -> AutoTopUp:
    if card.organisation_id != organisation.pk:
        raise BillingError("This card belongs to another organisation.", code="not_ours")
    if not MIN_TOP_UP_MINOR <= amount_minor <= MAX_TOP_UP_MINOR:
        raise BillingError("Top-ups are between 1.00 and 100,000.00.", code="invalid_amount")
    rule, _ = AutoTopUp.objects.update_or_create(organisation=organisation, defaults={
        "card": card, "threshold_minor": threshold_minor, "amount_minor": amount_minor, "enabled": enabled})
    return rule


def auto_top_ups_run() -> int:
    """Top up every organisation whose balance is under its threshold (periodic), unless one of its top-ups
    is still open (created or awaiting authentication). Returns how many top-ups were made."""
    made = 0
    for rule in AutoTopUp.objects.filter(enabled=True).select_related("organisation", "card").order_by("pk"):
        currency = settings.CURRENCY
        if account_balance_minor(account=_buyer_account(rule.organisation, currency)) >= rule.threshold_minor:
            continue
        if TopUp.objects.filter(organisation=rule.organisation, status__in=[
                TopUp.Status.CREATED, TopUp.Status.REQUIRES_ACTION]).exists():
            continue
        try:
            top_up = top_up_create(organisation=rule.organisation, amount_minor=rule.amount_minor,
                                   payment_method_id=rule.card.stripe_payment_method_id, currency=currency)
        except (stripe_api.StripeUnavailable, AlreadyClaimed):
            continue  # the open top-up is finished by pending_retry; no second one meanwhile
        if top_up.status == TopUp.Status.FAILED:
            rule.enabled = False  # a declined card is not retried every few minutes; the buyer re-enables
            rule.save(update_fields=["enabled", "updated_at"])
        made += 1
    return made
