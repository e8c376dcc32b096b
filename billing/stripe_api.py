"""The one module that imports ``stripe``: every call to Stripe goes through here.

- The API version is pinned (:data:`API_VERSION`); the base address comes from ``settings.STRIPE_API_BASE``
  (the local Stripe peer on the embedded profile and in tests, Stripe itself in production).
- Every request that moves money (or creates the object that will) carries a deterministic idempotency
  key that callers derive from our own rows (``top_up:12:confirm``). The key is stored in
  :class:`billing.models.StripeRequest` *before* the call and its outcome after; a key that succeeded is
  answered from the database and never sent again. Stripe also de-duplicates on the key; the local peer
  does not, so callers that retry after an unknown outcome look the object up first (see the services).
- Errors become :class:`StripeUnavailable` (transient: network, timeout, 5xx, rate limit; try again later)
  or :class:`StripeRefused` (Stripe said no; a card decline is :class:`PaymentDeclined`).
"""

import json
import time
from typing import Any

import stripe
from django.conf import settings

from billing.errors import BillingError
from billing.models import StripeRequest

API_VERSION = "2026-10-28.endive"

# Tests replace this with an HTTP client that injects timeouts; None means stripe's default client.
http_client: Any = None


class StripeUnavailable(BillingError):
    code = "stripe_unavailable"


class StripeRefused(BillingError):
    code = "stripe_refused"


class PaymentDeclined(StripeRefused):
    code = "payment_declined"


class WebhookSignatureInvalid(BillingError):
    code = "webhook_signature_invalid"


_default_http_client: Any = None


def _http_client():
    global _default_http_client
    if http_client is not None:
        return http_client
    if _default_http_client is None:
        _default_http_client = stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_S)
    return _default_http_client


def _client() -> stripe.StripeClient:
    base = settings.STRIPE_API_BASE
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY, stripe_version=API_VERSION,
        base_addresses={"api": base, "connect": base, "files": base},
        max_network_retries=0,  # retries are ours: after looking the object up, with the same key
        http_client=_http_client(),
    )


def _plain(obj) -> dict:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _translate(error: stripe.StripeError) -> BillingError:
    if isinstance(error, (stripe.APIConnectionError, stripe.RateLimitError)) or (error.http_status or 0) >= 500:
        return StripeUnavailable(f"Stripe is unavailable: {error.user_message or error}")
    if isinstance(error, stripe.CardError):
        return PaymentDeclined(error.user_message or "The card was declined.", extra={"decline_code": error.code})
    return StripeRefused(error.user_message or str(error), extra={"stripe_code": error.code})


def _read(call, *args, **kwargs) -> dict:
    """A request that moves nothing (retrieve, list): no key, no record."""
    try:
        return _plain(call(*args, **kwargs))
    except stripe.StripeError as error:
        raise _translate(error) from error


def _send(*, key: str, purpose: str, call, params: dict, path_arg: str | None = None) -> dict:
    """Store the request under ``key`` (outside any transaction, so the row survives a failure), send it
    with that idempotency key unless it already succeeded, store the outcome, return the object."""
    record, _ = StripeRequest.objects.get_or_create(key=key, defaults={"purpose": purpose, "params": params})
    if record.status == StripeRequest.Status.SUCCEEDED:
        return record.response
    record.attempts += 1
    record.save(update_fields=["attempts", "updated_at"])
    options = {"idempotency_key": key}
    try:
        obj = _plain(call(path_arg, params=params, options=options) if path_arg else call(params=params, options=options))
    except stripe.StripeError as error:
        translated = _translate(error)
        if isinstance(translated, StripeRefused):
            record.status = StripeRequest.Status.FAILED
        record.error = str(translated)[:2000]
        record.save(update_fields=["status", "error", "updated_at"])
        raise translated from error
    record.status, record.stripe_id, record.response, record.error = (
        StripeRequest.Status.SUCCEEDED, obj.get("id", ""), obj, "")
    record.save(update_fields=["status", "stripe_id", "response", "error", "updated_at"])
    return obj


# --- Customers, cards, payment intents ----------------------------------------------------------------

def customer_create(*, key: str, name: str, metadata: dict) -> dict:
    return _send(key=key, purpose="customer.create", call=_client().v1.customers.create,
                 params={"name": name, "metadata": metadata})


def setup_intent_create(*, key: str, customer: str, metadata: dict) -> dict:
    return _send(key=key, purpose="setup_intent.create", call=_client().v1.setup_intents.create,
                 params={"customer": customer, "usage": "off_session", "payment_method_types": ["card"],
                         "metadata": metadata})


def setup_intent_retrieve(setup_intent_id: str) -> dict:
    return _read(_client().v1.setup_intents.retrieve, setup_intent_id)


def setup_intent_confirm(setup_intent_id: str, *, payment_method: str) -> dict:
    """What Stripe.js does in the buyer's browser; the server uses it only in tests and demos."""
    return _read(_client().v1.setup_intents.confirm, setup_intent_id, params={"payment_method": payment_method})


def payment_method_create_test_card(*, number: str, exp_month: int, exp_year: int, cvc: str) -> dict:
    """A card PaymentMethod from raw test-card details: for the local Stripe peer only (the buyer page's
    test-card form when ``settings.STRIPE_IS_LOCAL_PEER``). Real card numbers never reach our server: in
    production the browser gives them to Stripe.js, and this refuses to run."""
    if not settings.STRIPE_IS_LOCAL_PEER:
        raise StripeRefused("Card details are only accepted by the local Stripe peer.", extra={"stripe_code": "not_local"})
    return _read(_client().v1.payment_methods.create, params={
        "type": "card", "card": {"number": number, "exp_month": exp_month, "exp_year": exp_year, "cvc": cvc}})


def payment_method_retrieve(payment_method_id: str) -> dict:
    return _read(_client().v1.payment_methods.retrieve, payment_method_id)


def payment_intent_create(*, key: str, amount: int, currency: str, customer: str, payment_method: str,
                          metadata: dict) -> dict:
    """Created unconfirmed: nothing is charged until :func:`payment_intent_confirm`."""
    return _send(key=key, purpose="payment_intent.create", call=_client().v1.payment_intents.create,
                 params={"amount": amount, "currency": currency, "customer": customer,
                         "payment_method": payment_method, "payment_method_types": ["card"],
                         "metadata": metadata})


def payment_intent_confirm(*, key: str, payment_intent_id: str) -> dict:
    return _send(key=key, purpose="payment_intent.confirm", call=_client().v1.payment_intents.confirm,
                 params={}, path_arg=payment_intent_id)


def payment_intent_retrieve(payment_intent_id: str) -> dict:
    return _read(_client().v1.payment_intents.retrieve, payment_intent_id)


def charge_retrieve(charge_id: str) -> dict:
    return _read(_client().v1.charges.retrieve, charge_id, params={"expand": ["balance_transaction"]})


def refund_create(*, key: str, payment_intent: str, amount: int, metadata: dict) -> dict:
    return _send(key=key, purpose="refund.create", call=_client().v1.refunds.create,
                 params={"payment_intent": payment_intent, "amount": amount, "metadata": metadata})


def refunds_list(*, payment_intent: str) -> list[dict]:
    return _read(_client().v1.refunds.list, params={"payment_intent": payment_intent, "limit": 100})["data"]


# --- Connect --------------------------------------------------------------------------------------------

def account_create(*, key: str, email: str, metadata: dict) -> dict:
    return _send(key=key, purpose="account.create", call=_client().v1.accounts.create,
                 params={"type": "express", "email": email, "capabilities": {"transfers": {"requested": True}},
                         "metadata": metadata})


def account_retrieve(account_id: str) -> dict:
    return _read(_client().v1.accounts.retrieve, account_id)


def account_link_create(*, account: str, refresh_url: str, return_url: str) -> dict:
    return _read(_client().v1.account_links.create, params={
        "account": account, "refresh_url": refresh_url, "return_url": return_url, "type": "account_onboarding"})


def transfer_create(*, key: str, amount: int, currency: str, destination: str, transfer_group: str,
                    metadata: dict) -> dict:
    return _send(key=key, purpose="transfer.create", call=_client().v1.transfers.create,
                 params={"amount": amount, "currency": currency, "destination": destination,
                         "transfer_group": transfer_group, "metadata": metadata})


def transfer_retrieve(transfer_id: str) -> dict:
    return _read(_client().v1.transfers.retrieve, transfer_id)


def transfers_list(*, transfer_group: str) -> list[dict]:
    """Every transfer of a settlement run (paging through all of them)."""
    found, params = [], {"transfer_group": transfer_group, "limit": 100}
    while True:
        page = _read(_client().v1.transfers.list, params=params)
        found += page["data"]
        if not page.get("has_more") or not page["data"]:
            return found
        params["starting_after"] = page["data"][-1]["id"]


def transfer_reversal_create(*, key: str, transfer_id: str, amount: int, metadata: dict) -> dict:
    return _send(key=key, purpose="transfer_reversal.create", call=_client().v1.transfers.reversals.create,
                 params={"amount": amount, "metadata": metadata}, path_arg=transfer_id)


# --- Webhooks -------------------------------------------------------------------------------------------

def webhook_verify(*, payload: bytes, signature_header: str | None, now: float | None = None) -> dict:
    """Check the ``Stripe-Signature`` header against our endpoint secret and the timestamp against the
    tolerance, in the past *and* in the future (stripe's own check looks only at the past). Returns the
    event as a plain dict."""
    tolerance = settings.STRIPE_WEBHOOK_TOLERANCE_S
    try:
        stripe.WebhookSignature.verify_header(payload, signature_header, settings.STRIPE_WEBHOOK_SECRET, tolerance)
        timestamp, _ = stripe.WebhookSignature._get_timestamp_and_signatures(
            signature_header, stripe.WebhookSignature.EXPECTED_SCHEME)
    except stripe.SignatureVerificationError as error:
        raise WebhookSignatureInvalid(str(error)) from error
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        raise WebhookSignatureInvalid("timestamp outside the tolerance zone")
    try:
        event = json.loads(payload)
    except ValueError as error:
        raise WebhookSignatureInvalid("payload is not JSON") from error
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        raise WebhookSignatureInvalid("payload is not an event")
    return event


def webhook_sign(*, payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header Stripe would send (tests and the local peer's deliveries)."""
    signature = stripe.WebhookSignature._compute_signature(f"{timestamp}.{payload.decode()}", secret)
    return f"t={timestamp},v1={signature}"
