from itertools import islice

from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import generics, permissions, serializers, status
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.money import price_per_million_tokens_micros
from marketplace import selectors, services
from marketplace.models import AIModel, Job


async def _stream(lines, chunk: int = 256):
    """Serve a synchronous (database-reading) line iterator to an ASGI server without loading it whole."""
    lines = iter(lines)
    take = sync_to_async(lambda: "".join(islice(lines, chunk)))
    while part := await take():
        yield part


class IsBuyer(permissions.BasePermission):
    message = "This endpoint is for buyer organisations (use an API key or sign in as a buyer)."

    def has_permission(self, request, view):
        return selectors.organisation_of(request) is not None


class AIModelSerializer(serializers.ModelSerializer):
    price_per_million_tokens_micros = serializers.SerializerMethodField(
        help_text="Last clearing price per precision, in micro-units per million tokens (null: no trade yet).")

    class Meta:
        model = AIModel
        fields = ["slug", "name", "description", "task", "precisions", "dims", "max_tokens", "ops_per_token",
                  "price_per_million_tokens_micros"]

    def get_price_per_million_tokens_micros(self, obj) -> dict:
        return selectors.model_prices(ai_model=obj)


class JobSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="ai_model.slug")
    progress_pct = serializers.IntegerField(read_only=True)
    max_price_per_million_tokens_micros = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = ["id", "model", "precision", "state", "max_price_micros", "max_price_per_million_tokens_micros",
                  "currency", "deadline", "docs_total", "tokens_total", "mops_total", "units_total", "units_done",
                  "progress_pct", "created_at", "started_at", "finished_at"]

    def get_max_price_per_million_tokens_micros(self, obj) -> int:
        return price_per_million_tokens_micros(price_micros=obj.max_price_micros, ops_per_token=obj.ai_model.ops_per_token)


class JobCreateSerializer(serializers.Serializer):
    model = serializers.CharField(help_text="Model slug from GET /api/v1/models/.")
    precision = serializers.CharField(help_text="int8 or fp32 (what the model supports).")
    max_price_micros = serializers.IntegerField(
        help_text="Sealed bid: the most you pay per compute unit (10^15 operations), in micro-units of the currency.")
    deadline = serializers.DateTimeField(help_text="ISO 8601; the job expires after it.")
    inputs = serializers.FileField(help_text='JSON Lines: one {"text": ..., "id": optional} object per line.')


class ModelListApi(generics.ListAPIView):
    """The model catalogue, with the last clearing price per precision."""

    serializer_class = AIModelSerializer
    permission_classes = [permissions.AllowAny]
    queryset = AIModel.objects.filter(active=True)
    pagination_class = None


class JobListCreateApi(APIView):
    permission_classes = [permissions.IsAuthenticated, IsBuyer]
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(responses=JobSerializer(many=True))
    def get(self, request):
        jobs = selectors.jobs_for(organisation=selectors.organisation_of(request))[:200]
        return Response(JobSerializer(jobs, many=True).data)

    @extend_schema(
        request={"multipart/form-data": JobCreateSerializer},
        responses={201: JobSerializer},
        examples=[OpenApiExample("embed documents", request_only=True, value={
            "model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": 2000000,
            "deadline": "2026-12-01T12:00:00Z", "inputs": "(file) docs.jsonl"})],
    )
    def post(self, request):
        data = JobCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = services.job_create(
            organisation=selectors.organisation_of(request), user=request.user, model_slug=data.validated_data["model"],
            precision=data.validated_data["precision"], max_price_micros=data.validated_data["max_price_micros"],
            deadline=data.validated_data["deadline"], inputs=data.validated_data["inputs"],
        )
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)


class JobDetailApi(generics.RetrieveAPIView):
    permission_classes = [permissions.IsAuthenticated, IsBuyer]
    serializer_class = JobSerializer

    def get_queryset(self):
        return selectors.jobs_for(organisation=selectors.organisation_of(self.request))


class JobCancelApi(APIView):
    permission_classes = [permissions.IsAuthenticated, IsBuyer]

    @extend_schema(request=None, responses=JobSerializer)
    def post(self, request, pk):
        job = get_object_or_404(selectors.jobs_for(organisation=selectors.organisation_of(request)), pk=pk)
        return Response(JobSerializer(services.job_cancel(job=job)).data)


class JobResultsApi(APIView):
    """Results as JSON Lines in input order: ``{"index", "id", "embedding"}`` per input (streamed)."""

    permission_classes = [permissions.IsAuthenticated, IsBuyer]

    @extend_schema(responses={(200, "application/x-ndjson"): str})
    def get(self, request, pk):
        job = get_object_or_404(selectors.jobs_for(organisation=selectors.organisation_of(request)), pk=pk)
        response = StreamingHttpResponse(_stream(selectors.job_results_lines(job=job)), content_type="application/x-ndjson")
        response["Content-Disposition"] = f'attachment; filename="job-{job.pk}-results.jsonl"'
        return response
