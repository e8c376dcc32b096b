"""Stripe events, after :func:`billing.stripe_api.webhook_verify` checked their signature.

Each event type we act on has one handler; every handler is idempotent on its own and tolerant of any
order (a success wins over a failure, a refund or dispute finds its top-up whatever arrived first). The
event id is stored, unique, in the same transaction as the handler's work, so a redelivered event does
nothing; the handler's outcome is stored on the event. Network reads a handler needs happen before that
transaction; if they fail the event is not stored and the view answers 503, so Stripe delivers it again.
"""

import logging
from collections.abc import Callable

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Q

from billing import payments, payouts
from billing.models import ConnectedAccount, Payout, Refund, StripeEvent, StripeEventFailure, TopUp

log = logging.getLogger(__name__)

def _id(value) -> str:
    return value.get("id", "") if isinstance(value, dict) else (value or "")


def _top_up_for_intent(intent: dict) -> TopUp | None:
    top_up = TopUp.objects.filter(payment_intent_id=intent["id"]).first()
    if top_up is None:  # our create's answer was lost, so we never stored the intent's id
        top_up_id = (intent.get("metadata") or {}).get("top_up_id", "")
        top_up = TopUp.objects.filter(pk=int(top_up_id), payment_intent_id__isnull=True).first() \
            if top_up_id.isdigit() else None
        if top_up:
            top_up.payment_intent_id = intent["id"]
            top_up.save(update_fields=["payment_intent_id", "updated_at"])
    return top_up


def _top_up_for_charge(charge_id: str, intent_id: str) -> TopUp | None:
    query = Q(charge_id=charge_id) if charge_id else Q(pk__in=[])
    if intent_id:
        query |= Q(payment_intent_id=intent_id)
    return TopUp.objects.filter(query).first()


def _prefetch(event_type: str, obj: dict) -> dict:
    """Reads from Stripe a handler needs, done before the event's transaction."""
    if event_type == "payment_intent.succeeded":
        top_up_id = (obj.get("metadata") or {}).get("top_up_id", "")
        top_up = TopUp.objects.filter(Q(payment_intent_id=obj["id"]) | Q(
            pk=int(top_up_id) if top_up_id.isdigit() else None, payment_intent_id__isnull=True)).first()
        if top_up is not None and top_up.status != TopUp.Status.SUCCEEDED:  # only for our own top-ups
            return {"fee_minor": payments._fee_minor(_id(obj.get("latest_charge")))}
    if event_type == "charge.dispute.created":
        top_up = _top_up_for_charge(_id(obj.get("charge")), _id(obj.get("payment_intent")))
        if top_up and top_up.status != TopUp.Status.SUCCEEDED:
            return {"fee_minor": payments._fee_minor(_id(obj.get("charge")))}
    return {}


def _payment_intent_succeeded(obj: dict, context: dict) -> str:
    top_up = _top_up_for_intent(obj)
    if top_up is None:
        return "not ours: no top-up for this payment intent"
    before = top_up.status
    top_up = payments.top_up_succeeded(top_up=top_up, charge_id=_id(obj.get("latest_charge")),
                                       fee_minor=context.get("fee_minor"))
    return f"top-up {top_up.pk} already credited" if before == TopUp.Status.SUCCEEDED else f"top-up {top_up.pk} credited"


def _payment_intent_failed(obj: dict, context: dict) -> str:
    top_up = _top_up_for_intent(obj)
    if top_up is None:
        return "not ours: no top-up for this payment intent"
    message = (obj.get("last_payment_error") or {}).get("message", "")
    top_up = payments.top_up_failed(top_up=top_up, message=message)
    return f"top-up {top_up.pk} is {top_up.status}"


def _charge_refunded(obj: dict, context: dict) -> str:
    top_up = _top_up_for_charge(obj["id"], _id(obj.get("payment_intent")))
    if top_up is None:
        return "not ours: no top-up for this charge"
    notes = []
    for stripe_refund in (obj.get("refunds") or {}).get("data", []):
        refund_id = (stripe_refund.get("metadata") or {}).get("refund_id", "")
        refund = Refund.objects.filter(top_up=top_up, pk=int(refund_id)).first() if refund_id.isdigit() else None
        if refund is None:
            notes.append(f"{stripe_refund.get('id')} not made by us: not booked, reconciliation reports it")
        elif refund.status == Refund.Status.PENDING:
            payments.refund_succeeded(refund=refund, stripe_refund_id=stripe_refund["id"])
            notes.append(f"refund {refund.pk} confirmed")
    return "; ".join(notes) or "nothing new"


def _charge_dispute_created(obj: dict, context: dict) -> str:
    top_up = _top_up_for_charge(_id(obj.get("charge")), _id(obj.get("payment_intent")))
    if top_up is None:
        return "not ours: no top-up for this charge"
    dispute = payments.dispute_record(top_up=top_up, stripe_dispute_id=obj["id"], amount_minor=int(obj["amount"]),
                                      reason=obj.get("reason") or "", fee_minor=context.get("fee_minor"))
    return (f"dispute {dispute.stripe_dispute_id}: {dispute.from_balance_minor} from the buyer's balance, "
            f"{dispute.loss_minor} platform loss")


def _account_updated(obj: dict, context: dict) -> str:
    account = ConnectedAccount.objects.filter(stripe_account_id=obj["id"]).first()
    if account is None:
        return "not ours: unknown connected account"
    account = payouts.connected_account_sync(account=account, stripe_account=obj)
    return f"account of owner {account.owner_id}: transfers {'active' if account.transfers_active else 'inactive'}"


def _transfer_event(obj: dict, context: dict) -> str:
    payout_id = (obj.get("metadata") or {}).get("payout_id", "")
    payout = Payout.objects.filter(Q(transfer_id=obj["id"]) | Q(pk=int(payout_id) if payout_id.isdigit() else None,
                                                                run__transfer_group=obj.get("transfer_group"))).first()
    if payout is None:
        return "not ours: no payout for this transfer"
    if payout.status == Payout.Status.PENDING:
        payouts.payout_sent(payout=payout, transfer_id=obj["id"])
        return f"payout {payout.pk} confirmed sent"
    if payout.transfer_id != obj["id"]:
        return f"payout {payout.pk} was paid by {payout.transfer_id}: this transfer is a duplicate, reconcile it"
    if int(obj.get("amount_reversed") or 0) != payout.reversed_minor:
        return f"payout {payout.pk}: Stripe shows {obj.get('amount_reversed')} reversed, we booked {payout.reversed_minor}"
    return f"payout {payout.pk} agrees"


#: The event types we act on, each with its handler ...
HANDLERS = {
    "payment_intent.succeeded": _payment_intent_succeeded,
    "payment_intent.payment_failed": _payment_intent_failed,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _charge_dispute_created,
    "account.updated": _account_updated,
}
#: ... and the families of types handled alike (``transfer.created``, ``transfer.reversed``, ...).
PREFIX_HANDLERS = {"transfer.": _transfer_event}


def handler_for(event_type: str) -> Callable[[dict, dict], str] | None:
    """The handler of an event type, or None for a type we do not act on (stored as ignored): the two tables
    above are the fixed list of accepted types."""
    if event_type in HANDLERS:
        return HANDLERS[event_type]
    return next((handler for prefix, handler in PREFIX_HANDLERS.items() if event_type.startswith(prefix)), None)


def event_process(*, event: dict) -> StripeEvent:
    """Act on a verified event at most once; return the stored event (its status and outcome)."""
    event_type = event["type"]
    existing = StripeEvent.objects.filter(event_id=event["id"]).first()
    if existing:
        return existing
    handler = handler_for(event_type)
    if handler is None:
        record, _ = StripeEvent.objects.get_or_create(
            event_id=event["id"], defaults={"type": event_type, "payload": event,
                                            "status": StripeEvent.Status.IGNORED, "outcome": "type not handled"})
        return record
    obj = (event.get("data") or {}).get("object") or {}
    context = _prefetch(event_type, obj)  # may raise StripeUnavailable: nothing stored, Stripe retries
    try:
        with transaction.atomic():
            record = StripeEvent.objects.create(event_id=event["id"], type=event_type, payload=event,
                                                 status=StripeEvent.Status.PROCESSED)
            record.outcome = handler(obj, context)[:300]
            record.save(update_fields=["outcome"])
            return record
    except IntegrityError:
        # Delivered twice at the same moment: the other delivery's transaction did the work.
        record = StripeEvent.objects.filter(event_id=event["id"]).first()
        if record is None:
            raise
        return record


def event_failure_record(*, event: dict, error: Exception) -> StripeEventFailure | None:
    """Record for the operators that ``event`` could not be processed now (its delivery is answered 503, so
    Stripe delivers it again); called after the failed transaction rolled back. None when the database itself
    is what failed: then the log line is all we can keep."""
    try:
        return StripeEventFailure.objects.create(event_id=event["id"][:100], type=event["type"][:60],
                                                 error=f"{type(error).__name__}: {error}"[:500])
    except DatabaseError:
        log.warning("could not record the failure of stripe event %s", event["id"], exc_info=True)
        return None
