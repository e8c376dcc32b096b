"""The buyer REST API (``/api/v1/``): catalogue, jobs, bids, rounds, webhooks. Every buyer endpoint is scoped
to the organisation the request acts for: another organisation's object is a 404. The guide: docs/api.md."""

import json
from itertools import islice
from typing import Iterator

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import generics, permissions, serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace import buyer_webhooks, flows, selectors, services
from marketplace.idempotency import SCHEMA_PARAMETER as IDEMPOTENCY_KEY, idempotent
from marketplace.models import PRECISION_CHOICES, AIModel, ApiKey, AuctionRound, Job, WebhookDelivery, WebhookEndpoint

# A sanity bound on bids ($1,000,000 per 10^15 operations), far above any market: it catches a bid typed in
# the wrong unit and keeps every charge computed from a bid within 64-bit database integers.
MAX_PRICE_MICROS = 10**12


async def _stream(lines, chunk: int = 256):
    """Serve a synchronous (database-reading) line iterator to an ASGI server without loading it whole."""
    lines = iter(lines)
    take = sync_to_async(lambda: "".join(islice(lines, chunk)))
    while part := await take():
        yield part


class Pagination(LimitOffsetPagination):
    max_limit = 500


class IsBuyer(permissions.BasePermission):
    message = "This endpoint is for buyer organisations (use an API key or sign in as a buyer)."

    def has_permission(self, request, view):
        return selectors.organisation_of(request) is not None


class BuyerApi(APIView):
    permission_classes = [permissions.IsAuthenticated, IsBuyer]

    @property
    def organisation(self):
        return selectors.organisation_of(self.request)

    def job(self, pk) -> Job:
        return get_object_or_404(selectors.jobs_for(organisation=self.organisation), pk=pk)


# --- schema helpers ------------------------------------------------------------------------------------

class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Stable, for programs: invalid, invalid_inputs, not_found, throttled, ...")
    message = serializers.CharField(help_text="For people; may change.")
    fields = serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False,
                                   help_text="code invalid: the problems per field.")
    lines = serializers.ListField(child=serializers.DictField(), required=False,
                                  help_text='code invalid_inputs: [{"line": 2, "message": "..."}], at most 50.')
    retry_after_s = serializers.IntegerField(required=False, help_text="When to try again (also in Retry-After).")


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


_ERROR_MEANINGS = {
    400: "The request is not valid (code invalid with fields, or invalid_inputs with lines).",
    401: "No API key, or an invalid or revoked one.",
    402: "Code insufficient_balance: the balance does not cover what the job must reserve (balance_minor, "
         "needed_minor). Top up, or set a lower budget cap.",
    403: "The credentials are not a buyer organisation's.",
    404: "No such object in your organisation.",
    409: "A conflict: the job is closed, or a request with this Idempotency-Key is still running.",
    410: "Code job_data_deleted: the job's documents and results were deleted (on request, or when its retention "
         "ended); its counts and charges stay.",
    413: "A JSON body over 2.5 MB.",
    422: "This Idempotency-Key was used for another request.",
    429: "Too many requests for this API key: wait Retry-After seconds.",
}


def _errors(*statuses: int) -> dict:
    return {code: OpenApiResponse(ErrorSerializer, description=_ERROR_MEANINGS[code]) for code in statuses}


_POST_ERRORS = (400, 401, 403, 409, 422, 429)

# --- catalogue -----------------------------------------------------------------------------------------


class PriceUnitSerializer(serializers.Serializer):
    name = serializers.CharField(help_text='What is counted: "token", "page".')
    per = serializers.IntegerField(help_text="How many of them one price is for: 1000000, 1000.")
    label = serializers.CharField(help_text='"per million tokens", "per thousand pages".')


class AIModelSerializer(serializers.ModelSerializer):
    price_unit = serializers.SerializerMethodField(help_text="What this model's prices are per (its workload's).")
    price_per_unit_micros = serializers.SerializerMethodField(
        help_text="Last clearing price per precision, in micro-units per price unit (null: no trade yet).")
    price_per_million_tokens_micros = serializers.SerializerMethodField(
        help_text="The same for a model priced per token (null for one priced per page).")
    default = serializers.SerializerMethodField(help_text="The catalogue's default model for its task.")

    class Meta:
        model = AIModel
        fields = ["slug", "name", "description", "task", "precisions", "dims", "max_tokens", "ops_per_token",
                  "licence", "size_bytes", "price_unit", "price_per_unit_micros", "price_per_million_tokens_micros",
                  "default"]

    @extend_schema_field(PriceUnitSerializer)
    def get_price_unit(self, obj) -> dict:
        unit = obj.price_unit
        return {"name": unit.name, "per": unit.per, "label": unit.label}

    def get_price_per_unit_micros(self, obj) -> dict[str, int | None]:
        return selectors.model_prices(ai_model=obj)

    def get_price_per_million_tokens_micros(self, obj) -> dict[str, int | None] | None:
        return selectors.model_prices(ai_model=obj) if obj.price_unit.name == "token" else None

    def get_default(self, obj) -> bool:
        default = selectors.default_model(task=obj.task)
        return default is not None and default.pk == obj.pk


class ModelListApi(generics.ListAPIView):
    """The model catalogue, with the last clearing price per precision (public)."""

    serializer_class = AIModelSerializer
    permission_classes = [permissions.AllowAny]
    queryset = AIModel.objects.filter(active=True)
    pagination_class = None


# --- jobs ----------------------------------------------------------------------------------------------

def _acting_user(request):
    """Who a job's history names for a change: the signed-in member, or the API key's creator."""
    user = request.user
    return user if user is not None and user.is_authenticated else None


class JobSerializer(serializers.ModelSerializer):
    """The schema of a job; its data is marketplace.selectors.job_public (what the webhooks carry too)."""

    model = serializers.CharField(source="ai_model.slug")
    task = serializers.CharField(source="ai_model.task", help_text="The model's workload (docs/workloads.md).")
    params = serializers.JSONField(help_text="The workload's parameters (a classifier's labels); {} for embeddings.")
    progress_pct = serializers.IntegerField(read_only=True)
    price_unit = serializers.CharField(read_only=True, help_text='What its prices are per: "per million tokens", '
                                                               '"per thousand pages" (its model\'s workload).')
    max_price_per_unit_micros = serializers.IntegerField(
        read_only=True, help_text="The bid in the buyer's terms: micro-units per price unit of the job's model.")
    max_price_per_million_tokens_micros = serializers.IntegerField(
        read_only=True, allow_null=True,
        help_text="The same for a model priced per token (null for one priced per page).")

    class Meta:
        model = Job
        fields = list(selectors.JOB_PUBLIC_FIELDS)

    def to_representation(self, instance) -> dict:
        return selectors.job_public(instance)


class DocumentSerializer(serializers.Serializer):
    """One input row (schema only: rows are checked by the service, which reports bad ones by number)."""

    text = serializers.CharField(help_text="The document; at most 64 KiB as a JSON line.")
    id = serializers.CharField(required=False,
                               help_text="Optional (string or integer, up to 256 characters), echoed in the results.")


@extend_schema_field(DocumentSerializer(many=True))
class DocumentsField(serializers.ListField):
    child = serializers.JSONField()


class JobParametersSerializer(serializers.Serializer):
    model = serializers.CharField(help_text="Model slug from GET /api/v1/models/.")
    precision = serializers.CharField(help_text="A precision the model runs at (see its precisions), e.g. int8.")
    max_price_micros = serializers.IntegerField(
        max_value=MAX_PRICE_MICROS,
        help_text="Sealed bid: the most you pay per compute unit (10^15 operations), in micro-units of the currency.")
    deadline = serializers.DateTimeField(help_text="ISO 8601; the job expires after it.")
    budget_cap_minor = serializers.IntegerField(
        required=False, allow_null=True, min_value=1,
        help_text="Optional: the most the job may spend, in minor units (cents). The auction bids only for the work "
                  "the rest of the budget can pay at the bid, so the job stops short of the cap.")
    params = serializers.JSONField(
        required=False,
        help_text="The workload's parameters, the same for every document (docs/workloads.md): none for embeddings; "
                  'for classification {"labels": ["invoice", {"name": "letter", "description": "...", '
                  '"examples": ["..."]}], "head"?: {"weights_b64": "...", "bias": [...]}}. In a multipart '
                  "upload, a JSON string.")


class JobCreateSerializer(JobParametersSerializer):
    inputs = serializers.FileField(
        help_text='JSON Lines: one {"text": ..., "id": optional} object per line. Streamed: any size.')


class JobCreateJsonSerializer(JobParametersSerializer):
    inputs = DocumentsField(help_text="The documents, for small jobs (the whole body is at most 2.5 MB). "
                                      "In errors, line n is the n-th document.")


class JobFilterSerializer(serializers.Serializer):
    state = serializers.CharField(
        required=False, source="states",
        help_text="One or more states, comma-separated: queued, running, completed, cancelled, expired.")
    model = serializers.SlugField(required=False, help_text="A model slug.")
    created_after = serializers.DateTimeField(required=False, help_text="ISO 8601, inclusive.")
    created_before = serializers.DateTimeField(required=False, help_text="ISO 8601, inclusive.")

    def validate_state(self, value: str) -> list[str]:
        states = [s.strip() for s in value.split(",") if s.strip()]
        if unknown := sorted(set(states) - set(Job.State.values)):
            raise serializers.ValidationError(
                f"Unknown state(s) {', '.join(unknown)}; known: {', '.join(Job.State.values)}.")
        return states


class BidSerializer(serializers.Serializer):
    max_price_micros = serializers.IntegerField(
        min_value=1, max_value=MAX_PRICE_MICROS,
        help_text="The new maximum price per compute unit (10^15 operations), in micro-units.")


class BudgetSerializer(serializers.Serializer):
    budget_cap_minor = serializers.IntegerField(
        min_value=1, allow_null=True,
        help_text="The new budget cap in minor units (cents), or null for none.")


_JOB_EXAMPLE = {"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": 2000000,
                "deadline": "2030-01-01T12:00:00Z"}


def _jsonl(rows: list) -> Iterator[bytes]:
    """The documents of a JSON body as the JSON Lines the service reads (row n is line n)."""
    return (json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in rows)


class JobListCreateApi(BuyerApi, generics.GenericAPIView):
    """Your organisation's jobs; create one (its inputs uploaded with it)."""

    pagination_class = Pagination
    serializer_class = JobSerializer

    @extend_schema(parameters=[JobFilterSerializer],
                   responses={200: JobSerializer(many=True), **_errors(400, 401, 403, 429)})
    def get(self, request):
        filters = JobFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        page = self.paginate_queryset(selectors.jobs_for(organisation=self.organisation, **filters.validated_data))
        return self.get_paginated_response(JobSerializer(page, many=True).data)

    def read_job(self, request) -> services.JobDraft:
        """The first phase of a submission: check it and read its inputs (slow for a large file; writes nothing)."""
        as_json = not request.content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))
        data = (JobCreateJsonSerializer if as_json else JobCreateSerializer)(data=request.data)
        data.is_valid(raise_exception=True)
        inputs = data.validated_data["inputs"]
        return services.job_prepare(
            model_slug=data.validated_data["model"], precision=data.validated_data["precision"],
            max_price_micros=data.validated_data["max_price_micros"], deadline=data.validated_data["deadline"],
            budget_cap_minor=data.validated_data.get("budget_cap_minor"), params=data.validated_data.get("params"),
            inputs=_jsonl(inputs) if as_json else inputs)

    @extend_schema(
        request={"multipart/form-data": JobCreateSerializer, "application/json": JobCreateJsonSerializer},
        parameters=[IDEMPOTENCY_KEY],
        responses={201: JobSerializer, **_errors(*_POST_ERRORS, 402, 413)},
        examples=[
            OpenApiExample("a JSON Lines file", request_only=True, media_type="multipart/form-data",
                           value={**_JOB_EXAMPLE, "inputs": "(file) docs.jsonl"}),
            OpenApiExample("a few documents", request_only=True, media_type="application/json",
                           value={**_JOB_EXAMPLE, "inputs": [{"id": "a", "text": "first document"},
                                                             {"text": "second"}]}),
        ],
    )
    @idempotent(prepare="read_job")
    def post(self, request, prepared: services.JobDraft):
        """Create a job: multipart/form-data with the inputs as a JSON Lines file (streamed: any size), or a
        JSON body with the documents in `inputs` (up to 2.5 MB). Bad rows are reported by line, and then
        nothing is created."""
        job = flows.job_create_from(organisation=self.organisation, user=request.user, draft=prepared)
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetailApi(BuyerApi):
    @extend_schema(responses={200: JobSerializer, **_errors(401, 403, 404, 429)})
    def get(self, request, pk):
        """A job's state and progress."""
        return Response(JobSerializer(self.job(pk)).data)


class JobCancelApi(BuyerApi):
    @extend_schema(request=None, parameters=[IDEMPOTENCY_KEY],
                   responses={200: JobSerializer, **_errors(*_POST_ERRORS, 404)})
    @idempotent
    def post(self, request, pk):
        """Stop a job: queued units are cancelled, leases withdrawn, the unused budget released. Finished
        units stay paid; cancelling a finished job changes nothing."""
        return Response(JobSerializer(flows.job_cancel(job=self.job(pk), by=_acting_user(request))).data)


class JobBidApi(BuyerApi):
    @extend_schema(request=BidSerializer, parameters=[IDEMPOTENCY_KEY],
                   responses={200: JobSerializer, **_errors(*_POST_ERRORS, 402, 404)},
                   examples=[OpenApiExample("raise the bid", request_only=True, value={"max_price_micros": 3000000})])
    @idempotent
    def post(self, request, pk):
        """Raise or lower the maximum price of an open (queued or running) job; the next auction round uses it.
        Lowering it gives up capacity already won above the new price."""
        data = BidSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = flows.job_bid_update(job=self.job(pk), max_price_micros=data.validated_data["max_price_micros"],
                                      by=_acting_user(request))
        return Response(JobSerializer(job).data)


class JobBudgetApi(BuyerApi):
    @extend_schema(request=BudgetSerializer, parameters=[IDEMPOTENCY_KEY],
                   responses={200: JobSerializer, **_errors(*_POST_ERRORS, 402, 404)},
                   examples=[OpenApiExample("raise the cap to $50", request_only=True, value={"budget_cap_minor": 5000})])
    @idempotent
    def post(self, request, pk):
        """Set, change or remove (null) the budget cap of an open job; the next auction round bids within it."""
        data = BudgetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = flows.job_budget_update(job=self.job(pk), budget_cap_minor=data.validated_data["budget_cap_minor"],
                                         by=_acting_user(request))
        return Response(JobSerializer(job).data)


class JobResultsApi(BuyerApi):
    @extend_schema(responses={(200, "application/x-ndjson"): OpenApiResponse(str, description=(
        'One line per input, in input order, with its workload\'s result (docs/workloads.md): {"index": 0, '
        '"id": "doc-1", "embedding": [...]} for embeddings, {"index": 0, "id": "doc-1", "label": "invoice", '
        '"scores": {"invoice": 0.61, ...}} for classification; an input not yet computed has "error": '
        '"not computed" instead.')), **_errors(401, 403, 404, 410, 429)})
    def get(self, request, pk):
        """The results as JSON Lines in input order, streamed. 410 once the job's data is deleted."""
        job = self.job(pk)
        services.job_data_check(job=job)
        response = StreamingHttpResponse(_stream(selectors.job_results_lines(job=job)),
                                         content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="job-{job.pk}-results.jsonl"'
        return response


class JobDataApi(BuyerApi):
    @extend_schema(request=None, responses={200: JobSerializer, **_errors(401, 403, 404, 429)})
    def delete(self, request, pk):
        """Delete the job's documents and results now (docs/api.md, "Data retention and deletion"). An open job
        is cancelled first. The job, its counts, charges and history stay; `data_deleted_at` says when its data
        went, and its results answer 410 `job_data_deleted`. Deleting again changes nothing."""
        return Response(JobSerializer(flows.job_data_delete(job=self.job(pk), by=_acting_user(request))).data)


# --- rounds --------------------------------------------------------------------------------------------

class RoundSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuctionRound
        fields = ["id", "market", "cleared_at", "interval_s", "clearing_price_micros", "offered_mops",
                  "demanded_mops", "sold_mops"]
        extra_kwargs = {
            "market": {"help_text": "The precision class."},
            "clearing_price_micros": {
                "help_text": "Micro-units per compute unit (10^15 operations); null when nothing traded."},
            "offered_mops": {"help_text": "Capacity the cars offered, in mega-ops (10^6 operations)."},
            "demanded_mops": {"help_text": "Work the open jobs bid for, in mega-ops."},
            "sold_mops": {"help_text": "Capacity sold, in mega-ops."},
        }


class RoundFilterSerializer(serializers.Serializer):
    market = serializers.ChoiceField(choices=PRECISION_CHOICES, required=False, help_text="A precision class.")
    since = serializers.DateTimeField(required=False, help_text="Only rounds cleared after this instant (ISO 8601).")
    traded = serializers.BooleanField(
        required=False, allow_null=True, default=None,
        help_text="true: only rounds with a price; false: only rounds where nothing traded.")


class RoundListApi(generics.GenericAPIView):
    """Price history: every cleared round, newest first. Aggregates only: no bid, buyer, job or car."""

    permission_classes = [permissions.IsAuthenticated]
    pagination_class = Pagination
    serializer_class = RoundSerializer

    @extend_schema(parameters=[RoundFilterSerializer],
                   responses={200: RoundSerializer(many=True), **_errors(400, 401, 429)})
    def get(self, request):
        filters = RoundFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        page = self.paginate_queryset(selectors.rounds_public(**filters.validated_data))
        return self.get_paginated_response(RoundSerializer(page, many=True).data)


# --- webhooks ------------------------------------------------------------------------------------------

class WebhookEndpointSerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookEndpoint
        fields = ["id", "url", "events", "description", "created_at"]


class WebhookEndpointCreatedSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(help_text="Signs every delivery (see docs/api.md). Shown only now: keep it.")

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]


class WebhookEndpointCreateSerializer(serializers.Serializer):
    url = serializers.URLField(max_length=2000, help_text="Where to POST events: https, on a public address.")
    events = serializers.ListField(child=serializers.ChoiceField(choices=buyer_webhooks.EVENT_TYPES), required=False,
                                   default=list, help_text="Event types to receive; empty or absent: all.")
    description = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)


class WebhookDeliverySerializer(serializers.ModelSerializer):
    event_id = serializers.CharField(source="event.public_id")
    event_type = serializers.CharField(source="event.type")

    class Meta:
        model = WebhookDelivery
        fields = ["id", "event_id", "event_type", "state", "attempts", "last_status_code", "last_error",
                  "last_attempt_at", "next_attempt_at", "delivered_at", "created_at"]


class WebhookEndpointListCreateApi(BuyerApi, generics.GenericAPIView):
    """Your organisation's webhook endpoints."""

    pagination_class = Pagination
    serializer_class = WebhookEndpointSerializer

    @extend_schema(responses={200: WebhookEndpointSerializer(many=True), **_errors(401, 403, 429)})
    def get(self, request):
        page = self.paginate_queryset(selectors.webhook_endpoints_for(organisation=self.organisation))
        return self.get_paginated_response(WebhookEndpointSerializer(page, many=True).data)

    @extend_schema(request=WebhookEndpointCreateSerializer, parameters=[IDEMPOTENCY_KEY],
                   responses={201: WebhookEndpointCreatedSerializer, **_errors(*_POST_ERRORS)},
                   examples=[OpenApiExample("every event", request_only=True,
                                            value={"url": "https://example.com/hooks/marketplace", "events": []})])
    @idempotent
    def post(self, request):
        """Register an endpoint. The answer holds its signing secret, shown this once."""
        data = WebhookEndpointCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        endpoint = buyer_webhooks.endpoint_create(organisation=self.organisation, created_by=request.user,
                                            **data.validated_data)
        return Response(WebhookEndpointCreatedSerializer(endpoint).data, status=status.HTTP_201_CREATED)


class WebhookEndpointDetailApi(BuyerApi):
    def endpoint(self, pk) -> WebhookEndpoint:
        return get_object_or_404(selectors.webhook_endpoints_for(organisation=self.organisation), pk=pk)

    @extend_schema(responses={200: WebhookEndpointSerializer, **_errors(401, 403, 404, 429)})
    def get(self, request, pk):
        return Response(WebhookEndpointSerializer(self.endpoint(pk)).data)

    @extend_schema(responses={204: None, **_errors(401, 403, 404, 429)})
    def delete(self, request, pk):
        """Stop sending to the endpoint; deliveries still pending are given up."""
        buyer_webhooks.endpoint_disable(endpoint=self.endpoint(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookDeliveryListApi(BuyerApi, generics.GenericAPIView):
    """An endpoint's delivery log, newest first: attempts, last status code or error, next retry."""

    pagination_class = Pagination
    serializer_class = WebhookDeliverySerializer

    @extend_schema(responses={200: WebhookDeliverySerializer(many=True), **_errors(401, 403, 404, 429)})
    def get(self, request, pk):
        endpoint = get_object_or_404(selectors.webhook_endpoints_for(organisation=self.organisation), pk=pk)
        page = self.paginate_queryset(selectors.webhook_deliveries_for(endpoint=endpoint))
        return self.get_paginated_response(WebhookDeliverySerializer(page, many=True).data)


# --- API keys ------------------------------------------------------------------------------------------

class ApiKeySerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "revoked_at",
                  "default_bid_per_million_tokens_micros"]
        read_only_fields = ["id", "name", "prefix", "created_at", "last_used_at", "revoked_at"]


class ApiKeyDefaultBidSerializer(serializers.Serializer):
    default_bid_per_million_tokens_micros = serializers.IntegerField(
        min_value=1, max_value=MAX_PRICE_MICROS, allow_null=True,
        help_text="The bid of the OpenAI-compatible batches (/v1/batches) made with this key that name none, in "
                  "micro-units per million tokens of their model; null: the documented default (docs/api.md).")


class ApiKeyListApi(BuyerApi, generics.GenericAPIView):
    """Your organisation's API keys (never their secrets: create keys on the buyer page)."""

    pagination_class = Pagination
    serializer_class = ApiKeySerializer

    @extend_schema(responses={200: ApiKeySerializer(many=True), **_errors(401, 403, 429)})
    def get(self, request):
        page = self.paginate_queryset(selectors.api_keys_for(organisation=self.organisation))
        return self.get_paginated_response(ApiKeySerializer(page, many=True).data)


class ApiKeyDetailApi(BuyerApi):
    def key(self, pk) -> ApiKey:
        return get_object_or_404(selectors.api_keys_for(organisation=self.organisation), pk=pk)

    @extend_schema(responses={200: ApiKeySerializer, **_errors(401, 403, 404, 429)})
    def get(self, request, pk):
        return Response(ApiKeySerializer(self.key(pk)).data)

    @extend_schema(request=ApiKeyDefaultBidSerializer, responses={200: ApiKeySerializer, **_errors(400, 401, 403, 404, 429)},
                   examples=[OpenApiExample("$0.02 per million tokens", request_only=True,
                                            value={"default_bid_per_million_tokens_micros": 20000})])
    def patch(self, request, pk):
        """Set (or remove, with null) the key's default bid for OpenAI-compatible batches."""
        data = ApiKeyDefaultBidSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = services.api_key_default_bid_set(
            key=self.key(pk), per_million_tokens_micros=data.validated_data["default_bid_per_million_tokens_micros"])
        return Response(ApiKeySerializer(key).data)
