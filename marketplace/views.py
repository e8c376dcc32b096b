from decimal import Decimal

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.http import JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.money import MICROS_PER_MAJOR, minor_to_major, mops_for_tokens
from billing.selectors import buyer_balance_minor, job_spend_minor
from fleet import workloads
from fleet.models import Vehicle
from marketplace import flows, market, selectors, services
from marketplace.core.errors import ApplicationError
from marketplace.forms import ApiKeyDefaultBidForm, ApiKeyForm, EstimateForm, JobForm, JobTermsForm, MemberAddForm, bid_micros
from marketplace.models import PRECISION_CHOICES, AIModel, ApiKey, AuctionRound, Job, User

MARKET_HISTORY_HOURS = 6
MARKET_HISTORY_ROUNDS = 2000


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
    return render(request, "marketplace/buyer_dashboard.html", {
        "organisation": organisation,
        "jobs": selectors.jobs_for(organisation=organisation)[:50],
        "keys": organisation.api_keys.order_by("-created_at"),
        "key_form": ApiKeyForm(),
        "new_key": request.session.pop("new_api_key", None),
    })


def _catalogue() -> list[dict]:
    """Active models with the price per price unit (a million tokens, a thousand pages) at each precision's last
    clearing price."""
    order = {task: i for i, task in enumerate(workloads.WORKLOADS)}
    models = sorted(AIModel.objects.filter(active=True, task__in=order), key=lambda m: (order[m.task], m.slug))
    catalogue = []
    for ai_model in models:
        prices = selectors.model_prices(ai_model=ai_model)
        workload = workloads.get(ai_model.task)
        catalogue.append({"model": ai_model, "workload": workload, "prices": prices,
                          "limits": workload.input_limits.format(max_tokens=ai_model.max_tokens),
                          "by_precision": [{"precision": p, "runs": p in prices, "price": prices.get(p)}
                                           for p, _ in PRECISION_CHOICES]})
    return catalogue


def _default_bid_per_unit(ai_model: AIModel | None, precision: str) -> Decimal:
    """The form's suggested bid (selectors.suggested_bid_micros) per price unit of the model (a million tokens, a
    thousand pages), in the major unit; 0 without a model."""
    per_unit = 0 if ai_model is None else ai_model.price_for_buyer(selectors.suggested_bid_micros(precision=precision))
    return (Decimal(per_unit) / MICROS_PER_MAJOR).quantize(Decimal("0.000001"))


@login_required
def job_new(request):
    organisation = _buyer_organisation(request)
    form = JobForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = flows.job_create(
                organisation=organisation, user=request.user, model_slug=data["model"].slug,
                precision=data["precision"], max_price_micros=data["max_price_micros"], deadline=data["deadline"],
                budget_cap_minor=data["budget_cap"], inputs=data["inputs"], params=data.get("params"))
        except ApplicationError as exc:
            for field, problems in exc.extra.get("fields", {}).items():
                field = "labels" if field == "params" else field  # the page's one parameter
                form.add_error(field if field in form.fields else None, problems)
            lines = exc.extra.get("lines", [])
            for line in lines:
                form.add_error("inputs", f"Line {line['line']}: {line['message']}")
            if exc.extra.get("bad_line_count", 0) > len(lines):
                form.add_error("inputs", f"… and {exc.extra['bad_line_count'] - len(lines)} more bad lines.")
            if not exc.extra.get("fields") and not lines:
                form.add_error(None, exc.message)
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Job {job.pk} created: {job.docs_total:,} documents in {job.units_total:,} "
                                      f"work units. It bids in the next auction round.")
            if request.headers.get("X-Requested-With") == "fetch":  # the page's upload script goes there itself
                return JsonResponse({"location": reverse("job-detail", args=[job.pk])}, status=201)
            return redirect("job-detail", pk=job.pk)
    elif request.method == "GET":
        ai_model = selectors.default_model()
        precision = ai_model.precisions[0] if ai_model else "int8"
        form = JobForm(initial={"model": ai_model, "precision": precision,
                                "max_price_per_unit": _default_bid_per_unit(ai_model, precision)})
    suggestions = {m.slug: {"unit": m.price_unit.label,
                            "bids": {p: str(_default_bid_per_unit(m, p)) for p in m.precisions}}
                   for m in AIModel.objects.filter(active=True)}
    return render(request, "marketplace/job_new.html", {
        "organisation": organisation, "form": form, "catalogue": _catalogue(), "suggestions": suggestions,
        "bid_margin_pct": selectors.SUGGESTED_BID_MARGIN_PCT,
        "balance_minor": buyer_balance_minor(organisation=organisation)})


@login_required
def job_estimate(request):
    """The new-job page's estimate (a fragment): cost and completion time from the market as it is now, and
    what the job will reserve from the balance."""
    organisation = _buyer_organisation(request)
    form = EstimateForm(request.GET)
    if not form.is_valid():
        return render(request, "marketplace/_estimate.html", {"form": form}, status=400)
    data = form.cleaned_data
    ai_model, tokens = data["model"], form.cost_units()
    max_price = bid_micros(ai_model=ai_model, per_unit=data["max_price_per_unit"])
    estimate = market.job_estimate(precision=data["precision"], max_price_micros=max_price, currency=settings.CURRENCY,
                                   mops=mops_for_tokens(tokens=tokens, ops_per_token=ai_model.ops_per_token))
    cheapest = estimate.cheapest_micros
    reserve = estimate.cost_at_most_minor if data["budget_cap"] is None else data["budget_cap"]
    return render(request, "marketplace/_estimate.html", {
        "form": form, "estimate": estimate, "tokens": tokens, "docs": data["docs"], "precision": data["precision"],
        "budget_cap_minor": data["budget_cap"], "reserve_minor": reserve,
        "balance_minor": buyer_balance_minor(organisation=organisation),
        "cheapest_per_unit_micros": None if cheapest is None else ai_model.price_for_buyer(cheapest),
        "price_unit": ai_model.price_unit,
    })


@login_required
def job_detail(request, pk):
    organisation = _buyer_organisation(request)
    job = get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk)
    progress = selectors.job_progress(job=job)
    estimate = None
    if job.state in Job.OPEN_STATES and progress.mops_left:
        estimate = market.job_estimate(precision=job.precision, max_price_micros=job.max_price_micros,
                                       mops=progress.mops_left, currency=job.currency, exclude_job_id=job.pk)
    if request.GET.get("fragment"):
        template, extra = "marketplace/_job_progress.html", {}
    else:
        template, extra = "marketplace/job_detail.html", {"events": job.events.select_related("by"), "terms_form": _terms_form(job),
                                                          "batch": selectors.batch_of_job(job=job),
                                                          "summary": selectors.job_results_summary(job=job),
                                                          "preview": selectors.job_results_preview(job=job),
                                                          "workload": workloads.get(job.ai_model.task)}
    return render(request, template, {
        **extra, "job": job, "progress": progress, "estimate": estimate,
        "data_retention": _duration(services.job_data_retention_s(job=job)),
        "bid_per_unit": job.ai_model.price_for_buyer(job.max_price_micros),
        "spent_minor": job_spend_minor(job=job),
    })


def _duration(seconds: int) -> str:
    """A retention in words: whole days, else whole hours, else seconds."""
    for size, unit in ((86400, "day"), (3600, "hour"), (1, "second")):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} seconds"


def _terms_form(job: Job, data=None) -> JobTermsForm:
    per_unit = job.ai_model.price_for_buyer(job.max_price_micros)
    initial = {"max_price_per_unit": Decimal(per_unit) / MICROS_PER_MAJOR,
               "budget_cap": None if job.budget_cap_minor is None else minor_to_major(job.budget_cap_minor, job.currency)}
    return JobTermsForm(data, ai_model=job.ai_model, initial=initial)


@login_required
@require_POST
def job_terms(request, pk):
    """Change an open job's bid and budget cap (each only if it changed)."""
    organisation = _buyer_organisation(request)
    job = get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk)
    form = _terms_form(job, request.POST)
    if not form.is_valid():
        for field, errors in form.errors.items():
            messages.error(request, f"{form.fields[field].label if field in form.fields else 'Terms'}: {' '.join(errors)}")
        return redirect("job-detail", pk=job.pk)
    # compared as shown: a bid read back per million tokens is rounded, and must not change by itself
    bid = form.cleaned_data["max_price_micros"]
    try:
        job = flows.job_terms_update(
            job=job, by=request.user,
            max_price_micros=bid if "max_price_per_unit" in form.changed_data and bid != job.max_price_micros else None,
            budget_cap_minor=form.cleaned_data["budget_cap"] if "budget_cap" in form.changed_data else flows.UNCHANGED)
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "The job's terms are changed: the next auction round uses them.")
    return redirect("job-detail", pk=job.pk)


@login_required
def job_results(request, pk):
    """The job's results as JSON Lines in input order, streamed (what is done so far while it runs)."""
    organisation = _buyer_organisation(request)
    job = get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk)
    try:
        services.job_data_check(job=job)
    except ApplicationError as exc:
        messages.error(request, exc.message)
        return redirect("job-detail", pk=job.pk)
    response = StreamingHttpResponse(selectors.job_results_lines(job=job), content_type="application/x-ndjson")
    response["Content-Disposition"] = f'attachment; filename="job-{job.pk}-results.jsonl"'
    return response


@login_required
@require_POST
def job_cancel(request, pk):
    organisation = _buyer_organisation(request)
    job = flows.job_cancel(job=get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk), by=request.user)
    messages.info(request, f"Job {job.pk} is {job.get_state_display().lower()}.")
    return redirect("job-detail", pk=job.pk)


@login_required
def job_data_delete(request, pk):
    """GET: the confirmation step; POST: delete the job's documents and results now (an open job is cancelled
    first). The job, its counts and its charges stay."""
    organisation = _buyer_organisation(request)
    job = get_object_or_404(selectors.jobs_for(organisation=organisation), pk=pk)
    if request.method == "POST":
        job = flows.job_data_delete(job=job, by=request.user)
        messages.info(request, f"The data of job {job.pk} is deleted: its documents and results are gone. "
                               f"Its counts and charges stay.")
        return redirect("job-detail", pk=job.pk)
    if job.data_deleted_at is not None:
        return redirect("job-detail", pk=job.pk)
    return render(request, "marketplace/job_data_delete.html", {"job": job, "batch": selectors.batch_of_job(job=job)})


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
def api_key_default_bid(request, pk):
    """Set or clear a key's default bid for OpenAI-compatible batches (docs/api.md)."""
    organisation = _buyer_organisation(request)
    key = get_object_or_404(ApiKey, pk=pk, organisation=organisation)
    form = ApiKeyDefaultBidForm(request.POST)
    if form.is_valid():
        services.api_key_default_bid_set(key=key, per_million_tokens_micros=form.per_million_tokens_micros())
        messages.info(request, f"The default batch bid of {key.name} is saved.")
    else:
        messages.error(request, "Default batch bid: " + " ".join(form.errors.get("default_bid", [])))
    return redirect(reverse("buyer-dashboard") + "#keys")


@login_required
@require_POST
def api_key_revoke(request, pk):
    organisation = _buyer_organisation(request)
    services.api_key_revoke(key=get_object_or_404(ApiKey, pk=pk, organisation=organisation))
    messages.info(request, "The API key is revoked.")
    return redirect(reverse("buyer-dashboard") + "#keys")


def market_view(request):
    """The market, as anyone may see it: clearing prices, offered and sold capacity, and the depth of supply by
    reserve price. Aggregates only; never a bid, a buyer or a job."""
    since = timezone.now() - timezone.timedelta(hours=MARKET_HISTORY_HOURS)
    rounds = list(selectors.rounds_public(since=since)[:MARKET_HISTORY_ROUNDS])
    depths = {depth.precision: depth for depth in market.market_depths()}
    reference = selectors.default_model()
    classes = []
    for precision, label in PRECISION_CHOICES:
        mine = [r for r in rounds if r.market == precision]
        last = next((r for r in mine if r.clearing_price_micros is not None), None)
        offered, sold = sum(r.offered_mops for r in mine), sum(r.sold_mops for r in mine)
        classes.append({
            "precision": precision, "label": label, "depth": depths[precision], "rounds": len(mine), "last": last,
            "last_per_unit_micros": None if last is None or reference is None else reference.price_for_buyer(
                last.clearing_price_micros),
            "sold_pct": round(100 * sold / offered) if offered else None,
        })
    return render(request, "marketplace/market.html", {
        "classes": classes, "rounds": rounds, "reference_model": reference, "history_hours": MARKET_HISTORY_HOURS,
        "catalogue": _catalogue(), "precisions": [p for p, _ in PRECISION_CHOICES],
        "any_supply": any(depth.cars for depth in depths.values()),
        "depth_data": [{"market": d.precision, "steps": [[price, round(rate)] for price, rate in d.steps]}
                       for d in depths.values()],
    })


@login_required
def team(request):
    organisation = _buyer_organisation(request)
    form = MemberAddForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            member = services.organisation_member_add(organisation=organisation, email=form.cleaned_data["email"],
                                                      added_by=request.user, base_url=request.build_absolute_uri("/"))
        except ApplicationError as exc:
            form.add_error("email", exc.extra.get("fields", {}).get("email", [exc.message]))
        else:
            messages.success(request, f"{member.email} is a member now: we emailed them a link to set a password.")
            return redirect("team")
    return render(request, "marketplace/team.html", {
        "organisation": organisation, "form": form,
        "members": organisation.members.filter(is_active=True).order_by("date_joined"),
    })


@login_required
@require_POST
def team_member_remove(request, pk):
    organisation = _buyer_organisation(request)
    member = get_object_or_404(User, pk=pk, organisation=organisation, is_active=True)
    try:
        services.organisation_member_remove(organisation=organisation, member=member, removed_by=request.user)
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.info(request, f"{member.email} is no longer a member.")
        if member == request.user:
            return redirect("home")
    return redirect("team")
