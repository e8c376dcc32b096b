from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.money import price_per_million_tokens_micros
from billing.selectors import job_spend_minor
from fleet.models import Vehicle
from marketplace import selectors, services
from marketplace.errors import ApplicationError
from marketplace.forms import ApiKeyForm, JobForm
from marketplace.models import AIModel, ApiKey, AuctionRound


def healthz(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok", "time": timezone.now().isoformat(),
                         "vehicles_connected": Vehicle.objects.filter(connected=True).count()})


def home(request):
    user = request.user
    if user.is_authenticated:
        if user.is_buyer:
            return redirect("buyer-dashboard")
        if user.is_owner:
            return redirect("owner-dashboard")
        if user.is_operator:
            return redirect("admin:index")
    return render(request, "home.html", {
        "models": AIModel.objects.filter(active=True),
        "rounds": AuctionRound.objects.all()[:10],
        "chart_rounds": reversed(AuctionRound.objects.filter(cleared_at__gte=timezone.now() - timezone.timedelta(hours=1))
                                 .order_by("-cleared_at")[:300]),
        "cars_online": Vehicle.objects.filter(connected=True).count(),
    })


def _buyer_organisation(request):
    organisation = selectors.organisation_of(request)
    if organisation is None:
        raise PermissionDenied("This page is for buyer organisations.")
    return organisation


@login_required
def buyer_dashboard(request):
    organisation = _buyer_organisation(request)
    form = JobForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        try:
            job = services.job_create(
                organisation=organisation, user=request.user, model_slug=form.cleaned_data["model"].slug,
                precision=form.cleaned_data["precision"], max_price_micros=form.cleaned_data["max_price_micros"],
                deadline=form.cleaned_data["deadline"], inputs=form.cleaned_data["inputs"])
        except ApplicationError as exc:
            for field, problems in exc.extra.get("fields", {}).items():
                form.add_error(field if field in form.fields else None, problems)
            for line in exc.extra.get("lines", []):
                form.add_error("inputs", f"Line {line['line']}: {line['message']}")
            if not exc.extra:
                form.add_error(None, exc.message)
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Job {job.pk} created: {job.docs_total} documents in {job.units_total} work units.")
            return redirect("job-detail", pk=job.pk)
    return render(request, "marketplace/buyer_dashboard.html", {
        "organisation": organisation,
        "jobs": selectors.jobs_for(organisation=organisation)[:50],
        "form": form,
        "keys": organisation.api_keys.order_by("-created_at"),
        "key_form": ApiKeyForm(),
        "new_key": request.session.pop("new_api_key", None),
    })


@login_required
def job_detail(request, pk):
    organisation = _buyer_organisation(request)
    job = get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk)
    working = job.units.filter(state="leased").values("leased_to").distinct().count()
    template = "marketplace/_job_progress.html" if request.GET.get("fragment") else "marketplace/job_detail.html"
    return render(request, template, {
        "job": job, "cars_working": working,
        "bid_per_mtok": price_per_million_tokens_micros(price_micros=job.max_price_micros,
                                                        ops_per_token=job.ai_model.ops_per_token),
        "spent_minor": job_spend_minor(job=job),
    })


@login_required
@require_POST
def job_cancel(request, pk):
    organisation = _buyer_organisation(request)
    job = services.job_cancel(job=get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk))
    messages.info(request, f"Job {job.pk} is {job.get_state_display().lower()}.")
    return redirect("job-detail", pk=job.pk)


@login_required
@require_POST
def api_key_create(request):
    organisation = _buyer_organisation(request)
    form = ApiKeyForm(request.POST)
    if form.is_valid():
        _, secret = services.api_key_create(organisation=organisation, name=form.cleaned_data["name"],
                                            created_by=request.user)
        request.session["new_api_key"] = secret
    return redirect(reverse("buyer-dashboard") + "#keys")


@login_required
@require_POST
def api_key_revoke(request, pk):
    organisation = _buyer_organisation(request)
    services.api_key_revoke(key=get_object_or_404(ApiKey, pk=pk, organisation=organisation))
    messages.info(request, "The API key is revoked.")
    return redirect(reverse("buyer-dashboard") + "#keys")
