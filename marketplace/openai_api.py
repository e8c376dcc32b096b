"""The OpenAI-compatible API under ``/v1/``: Files, Batches (for embeddings) and Models, so that code written
for OpenAI's Batch API runs against us by changing ``base_url``. Thin views: the file format is
marketplace.batches, the writes marketplace.services and marketplace.flows, the objects marketplace.selectors.

Differences from our ``/api/v1/``: routes without a trailing slash (the client does not follow redirects),
OpenAI's object shapes (``*_at`` as Unix seconds, ``file-...`` and ``batch_...`` ids, cursor pages with
``has_more``) and OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``. Authentication is
the same: an organisation's API key as the bearer token. These routes are not in our OpenAPI schema: OpenAI's
own reference describes them; docs/api.md lists where we differ."""

import math
from decimal import Decimal, InvalidOperation

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied, RequestDataTooBig
from django.http import Http404, HttpResponse, JsonResponse
from rest_framework import exceptions, permissions
from rest_framework.negotiation import BaseContentNegotiation, DefaultContentNegotiation
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.money import major_to_micros
from fleet.workloads.base import TOKENS
from marketplace import batches, flows, selectors, services
from marketplace.api import IsBuyer, _acting_user
from marketplace.authentication import ApiKeyAuthentication
from marketplace.core.errors import ApplicationError, ValidationFailed
from marketplace.models import AIModel

# --- errors --------------------------------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 402: "insufficient_quota",
          403: "permission_error", 404: "invalid_request_error", 405: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error"}


def _error(status_code: int, message: str, *, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> Response:
    body = {"error": {"message": message, "type": _TYPES.get(status_code, "server_error"), "param": param,
                      "code": code}}
    return Response(body, status=status_code, headers=headers)


def _param_of(extra: dict) -> str | None:
    if extra.get("param"):
        return extra["param"]
    fields = extra.get("fields") or {}
    return next(iter(fields), None)


def exception_handler(exc, context):
    """Every error of these routes in OpenAI's shape; a 429 carries Retry-After (the client waits that long)."""
    if isinstance(exc, ApplicationError):
        message = exc.message
        if exc.extra.get("fields"):
            message += " " + " ".join(f"{name}: {' '.join(problems)}" for name, problems in exc.extra["fields"].items())
        headers = {"Retry-After": str(exc.extra["retry_after_s"])} if "retry_after_s" in exc.extra else None
        return _error(exc.status, message, code=exc.code, param=_param_of(exc.extra), headers=headers)
    if isinstance(exc, Http404):
        return _error(404, "No such object.", code="not_found")
    if isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, RequestDataTooBig):
        return _error(413, "The request body is too large.", code="too_large")
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"": exc.detail}
        name, problems = next(iter(fields.items()))
        problems = problems if isinstance(problems, list) else [problems]
        return _error(400, f"{name}: {' '.join(str(p) for p in problems)}" if name else str(problems[0]),
                      code="invalid_value", param=name or None)
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        return _error(401, "Invalid or missing API key: send an organisation's key as 'Authorization: Bearer mk_...'.",
                      code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="api"'})
    if isinstance(exc, exceptions.Throttled):
        wait = math.ceil(exc.wait or 1)
        return _error(429, f"Too many requests: try again in {wait} s.", code="rate_limit_exceeded",
                      headers={"Retry-After": str(wait)})
    if isinstance(exc, exceptions.APIException):
        return _error(exc.status_code, str(exc.detail), code=getattr(exc.detail, "code", None))
    return None  # a bug: Django's 500 handling and logging take over


def not_found(request, path=""):
    """Any other path under /v1/: OpenAI's 404."""
    body = {"error": {"message": f"Unknown request URL: {request.method} /v1/{path}.", "type": "invalid_request_error",
                      "param": None, "code": "unknown_url"}}
    return JsonResponse(body, status=404)


class AnyAccept(BaseContentNegotiation):
    """JSON whatever the Accept header says: the client asks for ``application/binary`` for file content, and
    errors are JSON."""

    def select_parser(self, request, parsers):
        return DefaultContentNegotiation().select_parser(request, parsers)

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class OpenAIApi(APIView):
    content_negotiation_class = AnyAccept
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [permissions.IsAuthenticated, IsBuyer]
    renderer_classes = [JSONRenderer]
    parser_classes = [JSONParser]
    schema = None  # not in our OpenAPI schema: OpenAI's reference describes these routes

    def get_exception_handler(self):
        return exception_handler

    @property
    def organisation(self):
        return selectors.organisation_of(self.request)


def _page(request, queryset, public) -> Response:
    """OpenAI's cursor page: newest first, ``limit`` (1-100, 20) objects after the object ``after``."""
    try:
        limit = int(request.query_params.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise ValidationFailed("limit must be an integer from 1 to 100.", code="invalid_value", extra={"param": "limit"})
    if after := request.query_params.get("after"):
        anchor = queryset.filter(public_id=after).values_list("pk", flat=True).first()
        if anchor is None:
            raise ValidationFailed(f"No object {after!r} to list after.", code="invalid_value", extra={"param": "after"})
        queryset = queryset.filter(pk__lt=anchor)
    if request.query_params.get("order") == "asc":
        raise ValidationFailed("Only order=desc (newest first) is supported.", code="invalid_value",
                               extra={"param": "order"})
    rows = list(queryset[:limit + 1])
    data = [public(row) for row in rows[:limit]]
    return Response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                     "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit})


# --- models --------------------------------------------------------------------------------------------

class ModelListApi(OpenAIApi):
    def get(self, request):
        """The catalogue as OpenAI's model list: the ``id`` is what a request's ``body.model`` names."""
        data = [{"id": m.slug, "object": "model", "created": 0, "owned_by": "fleet-marketplace"}
                for m in AIModel.objects.filter(active=True).order_by("slug")]
        return Response({"object": "list", "data": data})


# --- files ---------------------------------------------------------------------------------------------

class FileListCreateApi(OpenAIApi):
    parser_classes = [MultiPartParser, FormParser]

    def get(self, request):
        files = selectors.batch_files_for(organisation=self.organisation, purpose=request.query_params.get("purpose"))
        return _page(request, files, selectors.batch_file_public)

    def post(self, request):
        """Upload a file of batch requests (multipart: ``file``, ``purpose=batch``)."""
        upload = request.FILES.get("file")
        if upload is None:
            raise ValidationFailed("Send the file as the multipart field 'file'.", code="invalid_value",
                                   extra={"param": "file"})
        expires = _expires_after({"anchor": request.data.get("expires_after[anchor]"),
                                  "seconds": request.data.get("expires_after[seconds]")}, "expires_after")
        file = services.batch_file_create(organisation=self.organisation, user=_acting_user(request), upload=upload,
                                          filename=upload.name, purpose=request.data.get("purpose", ""),
                                          expires_after_s=expires)
        return Response(selectors.batch_file_public(file))


class FileDetailApi(OpenAIApi):
    def file(self, file_id: str):
        file = selectors.batch_files_for(organisation=self.organisation).filter(public_id=file_id).first()
        if file is None:
            raise Http404
        return file

    def get(self, request, file_id):
        return Response(selectors.batch_file_public(self.file(file_id)))

    def delete(self, request, file_id):
        """Delete a file and its content (a batch made from it keeps running)."""
        file = self.file(file_id)
        services.batch_file_delete(file=file)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContentApi(FileDetailApi):
    def get(self, request, file_id):
        file = selectors.batch_files_for(organisation=self.organisation).defer(None).filter(public_id=file_id).first()
        if file is None:
            raise Http404
        response = HttpResponse(bytes(file.content), content_type="application/jsonl")
        response["Content-Disposition"] = f'attachment; filename="{file.filename}"'
        return response


# --- batches -------------------------------------------------------------------------------------------

def _price_micros(data: dict, endpoint: str) -> int | None:
    """The batch's bid from the request's extra fields, in its endpoint's price unit (``<unit>`` is
    ``million_tokens``, or ``thousand_pages`` for OCR): ``max_price_per_<unit>`` in the currency's major unit
    (dollars, as OpenAI's price list: 0.02), exactly to micro-units or refused; or ``max_price_per_<unit>_micros``,
    an integer as our own API takes it."""
    workload = batches.ENDPOINTS.get(endpoint)
    key = (workload.price_unit if workload is not None else TOKENS).key
    named, named_micros = f"max_price_per_{key}", f"max_price_per_{key}_micros"
    if (micros := data.get(named_micros)) is not None:
        if isinstance(micros, bool) or not isinstance(micros, int) or micros <= 0:
            raise ValidationFailed(f"{named_micros} must be a positive integer.",
                                   code="invalid_value", extra={"param": named_micros})
        return micros
    if (price := data.get(named)) is None:
        return None
    try:
        micros = major_to_micros(Decimal(str(price)) if isinstance(price, int | float | str) else price)
    except (InvalidOperation, TypeError, ValueError):
        micros = 0
    if micros <= 0:
        raise ValidationFailed(f"{named} must be a positive amount of the currency (e.g. 0.02 for $0.02 "
                               f"{key.replace('_', ' ')}), to at most 6 decimals.", code="invalid_value",
                               extra={"param": named})
    return micros


def _expires_after(value, param: str) -> int | None:
    """OpenAI's expiration policy, ``{"anchor": "created_at", "seconds": N}``, as N (None when absent); its
    range is checked by the service."""
    if not value or (isinstance(value, dict) and value.get("anchor") is None and value.get("seconds") is None):
        return None
    try:
        if value.get("anchor") != "created_at":
            raise ValueError
        return int(value["seconds"])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValidationFailed(f'{param} must be {{"anchor": "created_at", "seconds": N}}.', code="invalid_value",
                               extra={"param": param}) from None


def _metadata(value):
    """OpenAI's rule: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > 16
            or any(not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
                   for k, v in value.items())):
        raise ValidationFailed("metadata holds at most 16 string pairs (keys up to 64 characters, values up to 512).",
                               code="invalid_value", extra={"param": "metadata"})
    return value


def _string(data: dict, name: str, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValidationFailed(f"{name} is required (a string).", code="invalid_value", extra={"param": name})
    return value


class BatchListCreateApi(OpenAIApi):
    def get(self, request):
        flows.batches_finalize(organisation=self.organisation)
        return _page(request, selectors.batches_for(organisation=self.organisation), selectors.batch_public)

    def post(self, request):
        """Create a batch from an uploaded file: it runs as a job (see docs/api.md)."""
        data = request.data if isinstance(request.data, dict) else {}
        batch = flows.batch_create(
            organisation=self.organisation, user=_acting_user(request),
            input_file_id=_string(data, "input_file_id"), endpoint=_string(data, "endpoint"),
            completion_window=_string(data, "completion_window"), metadata=_metadata(data.get("metadata")),
            max_price_per_unit_micros=_price_micros(data, _string(data, "endpoint")),
            precision=_string(data, "precision", required=False),
            key_default_per_million_tokens_micros=request.auth.default_bid_per_million_tokens_micros,
            output_expires_after_s=_expires_after(data.get("output_expires_after"), "output_expires_after"))
        return Response(selectors.batch_public(batch))


class BatchDetailApi(OpenAIApi):
    def batch(self, batch_id: str):
        batch = selectors.batches_for(organisation=self.organisation).filter(public_id=batch_id).first()
        if batch is None:
            raise Http404
        if flows.batch_finalize(batch_id=batch.pk):  # its job closed: write its files before answering
            batch = selectors.batches_for(organisation=self.organisation).get(pk=batch.pk)
        return batch

    def get(self, request, batch_id):
        return Response(selectors.batch_public(self.batch(batch_id)))


class BatchCancelApi(BatchDetailApi):
    def post(self, request, batch_id):
        """Cancel a batch: what is finished is delivered (and paid for), the rest stops."""
        batch = flows.batch_cancel(batch=self.batch(batch_id), by=_acting_user(request))
        return Response(selectors.batch_public(batch))

