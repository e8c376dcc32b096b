"""One DRF exception handler: every API error is ``{"error": {"code": str, "message": str, ...}}``, with
``fields`` for invalid fields, ``lines`` for bad rows of an upload, and ``retry_after_s`` (also sent as the
``Retry-After`` header) when trying again later will help."""

import math

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from marketplace.core.errors import ApplicationError


class RequestTooLarge(exceptions.APIException):
    """A body read whole (JSON, or a form's fields) over ``DATA_UPLOAD_MAX_MEMORY_SIZE``: Django refuses it
    before reading it; files are not counted (they are streamed to disk)."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"
    default_detail = "The request body is too large: send large inputs as a JSON Lines file (multipart/form-data)."


def _flatten(detail) -> dict[str, list[str]]:
    if isinstance(detail, dict):
        return {key: [str(m) for m in (value if isinstance(value, list) else [value])] for key, value in detail.items()}
    return {"non_field_errors": [str(m) for m in (detail if isinstance(detail, list) else [detail])]}


def exception_handler(exc, context):
    if isinstance(exc, ApplicationError):
        body = exc.as_dict()
        headers = {"Retry-After": str(body["retry_after_s"])} if "retry_after_s" in body else None
        return Response({"error": body}, status=exc.status, headers=headers)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a bug: Django's 500 handling and logging take over
    if isinstance(exc, exceptions.ValidationError):
        body = {"code": "invalid", "message": "The request is not valid.", "fields": _flatten(exc.detail)}
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        body = {"code": getattr(detail, "code", None) or "error", "message": str(detail)}
    if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
        body["retry_after_s"] = math.ceil(exc.wait)
        response["Retry-After"] = str(body["retry_after_s"])
    response.data = {"error": body}
    return response
