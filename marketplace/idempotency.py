"""``Idempotency-Key`` on POST requests: a client that does not know whether its request arrived sends it
again with the same key, and the work is done once.

- The first request with a key *claims* it (a row committed at once; a unique constraint on (scope, key)
  makes concurrent duplicates safe: one claims, the others see the claim).
- The view's work and the stored response commit in **one transaction**, so a key is completed with its work
  done, or not completed with none of it done. A crash in between leaves an unfinished claim and no work: after
  ``IDEMPOTENCY_LOCK_S`` another request may take the claim over and do the work, and the crashed one, should it
  wake up, finds the claim no longer its own and rolls its work back.
- A repeat with the same body gets the first response (status and body) again, with ``Idempotent-Replayed: true``.
  A repeat with another method, path or body is refused (422); a repeat while the first still runs gets 409
  with ``Retry-After``. Responses of 500 and above are not kept: the claim is released and a retry runs again.
- Keys belong to the buyer organisation the request acts for (any of its API keys; otherwise the signed-in
  user) and expire ``IDEMPOTENCY_TTL_S`` (24 hours) after the first request; the ``idempotency-purge`` task
  deletes them, and an expired key is new again.
"""

import functools
import hashlib
import json
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import QueryDict
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from marketplace import selectors
from marketplace.core.errors import ApplicationError, Conflict, ValidationFailed
from marketplace.models import IdempotencyKey

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
SCHEMA_PARAMETER = OpenApiParameter(
    HEADER, str, OpenApiParameter.HEADER, required=False,
    description="Any unique string of up to 255 characters (a UUID is best). A repeat of the same request with "
                "the same key within 24 hours returns the first response without doing the work again.")


class IdempotencyKeyReused(ApplicationError):
    code = "idempotency_key_reused"
    status = 422


def request_fingerprint(request) -> str:
    """SHA-256 of the method, path (with query) and body. A form or multipart body counts by its fields, an
    uploaded file by its content (read again in chunks, then rewound for the view); a JSON body by its
    canonical form, so key order and spacing do not matter."""
    digest = hashlib.sha256(json.dumps([request.method, request.get_full_path()]).encode())
    data = request.data
    if isinstance(data, QueryDict):
        for name in sorted(data):
            for value in data.getlist(name):
                if hasattr(value, "chunks"):
                    content = hashlib.sha256()
                    for chunk in value.chunks():
                        content.update(chunk)
                    value.seek(0)
                    value = f"file:{content.hexdigest()}"
                digest.update(json.dumps([name, str(value)]).encode())
    else:
        digest.update(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode())
    return digest.hexdigest()


def _scope(request) -> str:
    organisation = selectors.organisation_of(request)
    return f"org:{organisation.pk}" if organisation is not None else f"user:{request.user.pk}"


def idempotency_claim(*, scope: str, key: str, fingerprint: str, path: str) -> tuple[IdempotencyKey, bool]:
    """Claim ``key`` for a request; returns (record, claimed). Not claimed: the record holds the first response
    to replay. Raises 422 for another request under the same key, 409 while the first still runs."""
    now = timezone.now()
    expired = now - timedelta(seconds=settings.IDEMPOTENCY_TTL_S)
    IdempotencyKey.objects.filter(scope=scope, key=key, created_at__lt=expired).delete()  # an expired key is new
    lock = secrets.token_hex(16)
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(scope=scope, key=key, fingerprint=fingerprint, path=path[:500],
                                                 lock=lock, locked_at=now, created_at=now), True
    except IntegrityError:
        record = IdempotencyKey.objects.filter(scope=scope, key=key).first()
    if record is None:  # released by a failed first request a moment ago: it never happened
        return idempotency_claim(scope=scope, key=key, fingerprint=fingerprint, path=path)
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            f"This {HEADER} was used for another request ({record.path}, or another body): "
            "use a new key for a new request.")
    if record.response_status is not None:
        return record, False
    stale = now - timedelta(seconds=settings.IDEMPOTENCY_LOCK_S)
    taken_over = (IdempotencyKey.objects.filter(pk=record.pk, response_status=None, locked_at__lt=stale)
                  .update(lock=lock, locked_at=now))
    if taken_over:
        record.lock, record.locked_at = lock, now
        return record, True
    raise Conflict(f"A request with this {HEADER} is still running; retry when it has finished.",
                   code="idempotency_key_in_progress", extra={"retry_after_s": 1})


def idempotency_complete(*, record: IdempotencyKey, status: int, body) -> None:
    """Store the response; call it in the transaction of the work, which it rolls back (by raising) when
    another request took the claim over meanwhile."""
    stored = IdempotencyKey.objects.filter(pk=record.pk, lock=record.lock, response_status=None).update(
        response_status=status, response_body=body, completed_at=timezone.now())
    if not stored:
        raise Conflict(f"This request's {HEADER} was taken over by a later request; its result is that request's.",
                       code="idempotency_key_in_progress", extra={"retry_after_s": 1})


def idempotency_release(*, record: IdempotencyKey) -> None:
    """Give up an unfinished claim (the request failed with no stored response), so a retry runs again."""
    IdempotencyKey.objects.filter(pk=record.pk, lock=record.lock, response_status=None).delete()


def idempotency_keys_purge() -> int:
    """Delete keys older than their 24 hours (periodic)."""
    cutoff = timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_TTL_S)
    return IdempotencyKey.objects.filter(created_at__lt=cutoff).delete()[0]


def idempotent(handler=None, *, prepare: str | None = None):
    """Decorate an API view's ``post``: honour the ``Idempotency-Key`` header (see the module's docstring).
    It runs after authentication, permissions and throttling, so refused requests use no key.

    ``prepare`` names a view method to run first, outside the transaction, for slow work that writes nothing
    (reading an upload); the handler gets its result as ``prepared``. The work's transaction, with the stored
    response, is then short (on SQLite a transaction holds the one write lock). Stripe calls these phases
    "atomic phases"."""
    if handler is None:
        return functools.partial(idempotent, prepare=prepare)

    @functools.wraps(handler)
    def post(view, request, *args, **kwargs):
        key = request.headers.get(HEADER)
        if key is None:
            if prepare:
                kwargs["prepared"] = getattr(view, prepare)(request, *args, **kwargs)
            return handler(view, request, *args, **kwargs)
        if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
            raise ValidationFailed(f"The {HEADER} header is not valid.",
                                   extra={"fields": {HEADER: ["Use 1 to 255 printable ASCII characters."]}})
        record, claimed = idempotency_claim(scope=_scope(request), key=key, fingerprint=request_fingerprint(request),
                                            path=f"{request.method} {request.path}")
        if not claimed:
            return Response(record.response_body, status=record.response_status, headers={REPLAYED_HEADER: "true"})
        try:
            return _first_response(view, request, args, kwargs, handler=handler, prepare=prepare, record=record)
        except _NotKept as failed:
            idempotency_release(record=record)
            return failed.response
        except BaseException:
            idempotency_release(record=record)
            raise

    post.idempotent = True
    return post


def _first_response(view, request, args, kwargs, *, handler, prepare, record: IdempotencyKey):
    """Run the request's phases and keep its response: an API error is a response to keep too (anything
    else is re-raised by ``handle_exception``), and the work of a failed phase is undone."""
    if prepare:
        try:
            kwargs = {**kwargs, "prepared": getattr(view, prepare)(request, *args, **kwargs)}
        except Exception as exc:
            response = view.handle_exception(exc)
            with transaction.atomic():
                return _keep(record, response)
    with transaction.atomic():
        try:
            with transaction.atomic():
                response = handler(view, request, *args, **kwargs)
        except Exception as exc:
            response = view.handle_exception(exc)
        return _keep(record, response)


def _keep(record: IdempotencyKey, response):
    if response.status_code >= 500:
        raise _NotKept(response)
    body = None if response.data is None else json.loads(JSONRenderer().render(response.data))
    idempotency_complete(record=record, status=response.status_code, body=body)
    return response


class _NotKept(Exception):
    """A 5xx response: its work is rolled back and its claim released."""

    def __init__(self, response):
        super().__init__(response.status_code)
        self.response = response
