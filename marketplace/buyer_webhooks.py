"""Outbound signed webhooks to buyers: endpoints, events and their delivery.

Events are recorded in the transaction that changes the job (a transactional outbox): an event exists if and
only if its change committed, so a crash between the two cannot lose one, and nothing slow happens in that
transaction. A periodic sweep (:func:`deliveries_send`, run by the ``webhooks-send`` task) sends what is due,
concurrently, and books every attempt: a 2xx answer is delivered; anything else (an error status, a
redirect, a timeout, a refused connection) is tried again after an exponential backoff, up to
``WEBHOOK_MAX_ATTEMPTS`` attempts. Delivery is at least once; receivers de-duplicate by the event's id.

The signature is Stripe's scheme: ``Marketplace-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under the endpoint's secret>``; a receiver recomputes it and refuses old timestamps."""

import asyncio
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from collections import Counter
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.utils.encoders import JSONEncoder

from marketplace.core.errors import ValidationFailed
from marketplace.models import (
    WEBHOOK_EVENT_TYPES,
    Batch,
    Job,
    Organisation,
    User,
    WebhookDelivery,
    WebhookEndpoint,
    BuyerWebhookEvent,
)
from marketplace.selectors import batch_public, job_public

EVENT_TYPES = [event_type for event_type, _ in WEBHOOK_EVENT_TYPES]
SIGNATURE_HEADER = "Marketplace-Signature"
USER_AGENT = "fleet-marketplace-webhooks/1"
MAX_ENDPOINTS = 16  # per organisation: every event is sent to each of them
_ENDS = {Job.State.COMPLETED: "job.completed", Job.State.CANCELLED: "job.failed", Job.State.EXPIRED: "job.failed"}


def signature(*, secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def retry_delay(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: the base, doubled after each failure."""
    return timedelta(seconds=settings.WEBHOOK_RETRY_BASE_S * 2 ** (attempts - 1))


def _address_problem(url: str) -> str | None:
    """Why the platform will not send to ``url``, or None. Unless private addresses are allowed (the embedded
    profile), an endpoint must be https and resolve to public addresses only: a buyer's webhook must not be a
    way into the platform's own network. Checked at creation and again before every attempt (DNS changes)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return "has a port out of range"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL"
    if settings.WEBHOOK_ALLOW_PRIVATE_URLS:
        return None
    if parts.scheme != "https":
        return "must use https"
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, type=socket.SOCK_STREAM)
    except OSError:
        return f"has a host name that does not resolve ({parts.hostname})"
    if not all(ipaddress.ip_address(info[4][0].split("%")[0]).is_global for info in infos):
        return "must resolve to public addresses only"
    return None


# --- endpoints -----------------------------------------------------------------------------------------

def endpoint_create(*, organisation: Organisation, url: str, events: list[str], description: str = "",
                    created_by: User | None = None) -> WebhookEndpoint:
    """Register an endpoint with a new signing secret (the caller shows it to the buyer once)."""
    errors: dict[str, list[str]] = {}
    if problem := _address_problem(url):
        errors["url"] = [f"The URL {problem}."]
    if unknown := sorted(set(events) - set(EVENT_TYPES)):
        errors["events"] = [f"Unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}."]
    if organisation.webhook_endpoints.filter(disabled_at=None).count() >= MAX_ENDPOINTS:
        errors["non_field_errors"] = [f"An organisation has at most {MAX_ENDPOINTS} webhook endpoints."]
    if errors:
        raise ValidationFailed("The webhook endpoint is not valid.", extra={"fields": errors})
    return WebhookEndpoint.objects.create(organisation=organisation, url=url, events=sorted(set(events)),
                                          secret="whsec_" + secrets.token_urlsafe(32), description=description,
                                          created_by=created_by)


@transaction.atomic
def endpoint_disable(*, endpoint: WebhookEndpoint) -> None:
    """Stop sending to an endpoint; its delivery log stays for the operators."""
    now = timezone.now()
    WebhookEndpoint.objects.filter(pk=endpoint.pk, disabled_at=None).update(disabled_at=now)
    endpoint.deliveries.filter(state=WebhookDelivery.State.PENDING).update(
        state=WebhookDelivery.State.FAILED, next_attempt_at=None, last_error="endpoint deleted")


# --- events --------------------------------------------------------------------------------------------

def job_event_record(*, job: Job) -> BuyerWebhookEvent | None:
    """Record the event that a change of ``job`` calls for, if the organisation listens for it.

    Call it in the transaction that changed the job, with the job's row locked (``select_for_update``): the
    lock serialises the at-most-once-a-minute check of ``job.progress``. Costs one query when nobody listens."""
    event_type = _ENDS.get(job.state) or ("job.progress" if job.units_done else None)
    if event_type is None:
        return None
    endpoints = [e for e in WebhookEndpoint.objects.filter(organisation_id=job.organisation_id, disabled_at=None)
                 if e.receives(event_type)]
    if not endpoints:
        return None
    now = timezone.now()
    earlier = BuyerWebhookEvent.objects.filter(job=job, type=event_type)
    if event_type == "job.progress":
        earlier = earlier.filter(created_at__gt=now - timedelta(seconds=settings.WEBHOOK_PROGRESS_INTERVAL_S))
    if earlier.exists():
        return None
    return _event_create(job=job, event_type=event_type, endpoints=endpoints, now=now, data={})


def job_rows_corrected_record(*, job: Job, rows: list) -> BuyerWebhookEvent | None:
    """Tell the buyer that rows of a finished job changed (docs/verification.md, "Delivery"): ``rows`` are
    the documents' ids, whose results are now the platform's own. Call it in the transaction that corrected
    them."""
    endpoints = [e for e in WebhookEndpoint.objects.filter(organisation_id=job.organisation_id, disabled_at=None)
                 if e.receives("job.results_corrected")]
    if not endpoints:
        return None
    return _event_create(job=job, event_type="job.results_corrected", endpoints=endpoints, now=timezone.now(),
                         data={"rows": rows})


def batch_event_record(*, batch: Batch) -> BuyerWebhookEvent | None:
    """Record ``batch.completed``, ``batch.failed``, ``batch.expired`` or ``batch.cancelled`` for a batch whose
    files were just written, in that transaction (the job's own ``job.*`` events were recorded with its
    changes). ``data.id`` is the batch's id, as OpenAI's batch events carry it; ``data.batch`` the batch as
    ``GET /v1/batches/{id}`` shows it, and ``data.job`` its job, if it has one."""
    event_type = f"batch.{batch_public(batch)['status']}"
    if event_type not in EVENT_TYPES:
        return None
    endpoints = [e for e in WebhookEndpoint.objects.filter(organisation_id=batch.organisation_id, disabled_at=None)
                 if e.receives(event_type)]
    if not endpoints:
        return None
    return _event_create(job=batch.job, organisation_id=batch.organisation_id, event_type=event_type,
                         endpoints=endpoints, now=timezone.now(),
                         data={"id": batch.public_id, "batch": batch_public(batch)})


def _event_create(*, job: Job | None, event_type: str, endpoints: list, now, data: dict,
                  organisation_id: int | None = None) -> BuyerWebhookEvent:
    public_id = f"evt_{secrets.token_hex(12)}"
    about = {"job": job_public(job)} if job is not None else {}
    body = json.dumps({"id": public_id, "type": event_type, "created": int(now.timestamp()),
                       "data": {**about, **data}}, cls=JSONEncoder, separators=(",", ":"))
    event = BuyerWebhookEvent.objects.create(public_id=public_id, organisation_id=organisation_id or job.organisation_id,
                                             job=job, type=event_type, body=body, created_at=now)
    WebhookDelivery.objects.bulk_create(WebhookDelivery(event=event, endpoint=endpoint, next_attempt_at=now)
                                        for endpoint in endpoints)
    return event


# --- delivery ------------------------------------------------------------------------------------------

def deliveries_send(*, limit: int = 100) -> int:
    """Attempt every delivery that is due, at most ``limit`` of them at once; returns how many were tried.

    The batch is claimed first (its next attempt is pushed past the time a pass can take), so overlapping
    sweeps never send the same delivery twice at once; the requests then go out concurrently, bounded by
    ``WEBHOOK_TIMEOUT_S``, with no database transaction open: one endpoint's deliveries one after the other in
    the order their events happened (so a receiver sees a job's progress before its completion), different
    endpoints side by side."""
    now = timezone.now()
    due = WebhookDelivery.objects.filter(state=WebhookDelivery.State.PENDING, next_attempt_at__lte=now)
    if not due.exists():  # the usual case, answered without a transaction (on SQLite, one takes the write lock)
        return 0
    with transaction.atomic():
        due = due.select_related("event", "endpoint").order_by("next_attempt_at")
        if connection.vendor == "postgresql":
            due = due.select_for_update(skip_locked=True, of=("self",))
        batch = list(due[:limit])
        if not batch:
            return 0
        longest = max(Counter(d.endpoint_id for d in batch).values())  # one endpoint's deliveries go in turn
        claim = now + timedelta(seconds=(longest + 1) * settings.WEBHOOK_TIMEOUT_S + 30)
        WebhookDelivery.objects.filter(pk__in=[d.pk for d in batch]).update(next_attempt_at=claim)
    refused = {d.pk: problem for d in batch if (problem := _address_problem(d.endpoint.url))}
    outcomes = asyncio.run(_post_all([d for d in batch if d.pk not in refused]))
    outcomes.update({pk: (None, f"not sent: the URL {problem}") for pk, problem in refused.items()})
    done = timezone.now()
    with transaction.atomic():
        for delivery in batch:
            _attempt_record(delivery=delivery, outcome=outcomes[delivery.pk], now=done)
    return len(batch)


async def _post_all(batch: list[WebhookDelivery]) -> dict[int, tuple[int | None, str]]:
    queues: dict[int, list[WebhookDelivery]] = {}
    for delivery in sorted(batch, key=lambda d: (d.event.created_at, d.event_id)):
        queues.setdefault(delivery.endpoint_id, []).append(delivery)
    outcomes: dict[int, tuple[int | None, str]] = {}

    async def in_order(queue: list[WebhookDelivery]) -> None:
        for delivery in queue:
            outcomes[delivery.pk] = await _post(client, delivery)

    async with httpx.AsyncClient(timeout=settings.WEBHOOK_TIMEOUT_S, follow_redirects=False,
                                 headers={"User-Agent": USER_AGENT}) as client:
        await asyncio.gather(*(in_order(queue) for queue in queues.values()))
    return outcomes


async def _post(client: httpx.AsyncClient, delivery: WebhookDelivery) -> tuple[int | None, str]:
    """One attempt: (HTTP status or None, error text or "")."""
    body = delivery.event.body.encode()
    headers = {"Content-Type": "application/json",
               SIGNATURE_HEADER: signature(secret=delivery.endpoint.secret, timestamp=int(time.time()), body=body)}
    try:
        response = await client.post(delivery.endpoint.url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    return response.status_code, "" if response.is_success else f"answered HTTP {response.status_code}"


def _attempt_record(*, delivery: WebhookDelivery, outcome: tuple[int | None, str], now: datetime) -> None:
    status, error = outcome
    attempts = delivery.attempts + 1
    fields = {"attempts": attempts, "last_attempt_at": now, "last_status_code": status, "last_error": error}
    if not error:
        fields.update(state=WebhookDelivery.State.SUCCEEDED, delivered_at=now, next_attempt_at=None)
    elif attempts >= settings.WEBHOOK_MAX_ATTEMPTS:
        fields.update(state=WebhookDelivery.State.FAILED, next_attempt_at=None)
    else:
        fields.update(next_attempt_at=now + retry_delay(attempts))
    # Still pending: an endpoint deleted meanwhile keeps its deliveries given up.
    WebhookDelivery.objects.filter(pk=delivery.pk, state=WebhookDelivery.State.PENDING).update(**fields)
