"""The owner's pages: the dashboard of their cars, one car's page, its limits, and the buttons that act on a
car. Every page is for signed-in car owners (anonymous: sign-in redirect; other accounts: 403) and every car
is looked up among the owner's own cars (another owner's car: 404). Changes go through fleet.services."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from billing.money import format_femto_as_minor
from billing.selectors import owner_earnings_femto, owner_earnings_minor
from fleet import portal, services, workloads
from fleet.forms import LimitsForm, VehicleForm
from fleet.models import HardwareGeneration, Vehicle
from fleet.selectors import vehicles_of
from marketplace.core.errors import ValidationFailed


def _require_owner(request) -> None:
    if not request.user.is_owner:
        raise PermissionDenied("These pages are for car owners.")


def _owner_car(request, pk: int) -> Vehicle:
    """The signed-in owner's car ``pk``; another owner's (or a removed) car is a 404."""
    _require_owner(request)
    return get_object_or_404(vehicles_of(owner=request.user), pk=pk)


def _back(request, default: str):
    """Redirect to the page the form came from (``next``), if it is ours; else to ``default``."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return redirect(target)
    return redirect(default)


def _agent_server(request) -> str:
    return f"{request.scheme}://{request.get_host()}"


@login_required
def owner_dashboard(request):
    _require_owner(request)
    now = timezone.now()
    if request.GET.get("fragment") == "cars":
        return render(request, "fleet/_cars_table.html", {"cars": portal.dashboard_cars(owner=request.user, now=now)})
    form = VehicleForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        vehicle, code = services.vehicle_create(owner=request.user, name=form.cleaned_data["name"],
                                                hardware=form.cleaned_data["hardware"])
        request.session["pairing"] = {"vehicle": vehicle.pk, "code": code}
        messages.success(request, f"{vehicle.name} added. Pair its agent with the code below within 15 minutes.")
        return redirect("owner-dashboard")
    cars = portal.dashboard_cars(owner=request.user, now=now)
    return render(request, "fleet/owner_dashboard.html", {
        "cars": cars, "form": form, "units_total": sum(c["units_done"] for c in cars),
        "pairing": request.session.pop("pairing", None), "agent_server": _agent_server(request),
        "earnings_minor": owner_earnings_minor(owner=request.user),
        "earnings_cents": format_femto_as_minor(owner_earnings_femto(owner=request.user, currency=settings.CURRENCY),
                                                settings.CURRENCY),
        "any_paused": any(c["vehicle"].policy.paused for c in cars),
        "any_running": any(not c["vehicle"].policy.paused for c in cars),
        "hardware": HardwareGeneration.objects.prefetch_related("throughputs"),
    })


@login_required
@require_POST
def vehicles_pause_all(request, pause: bool):
    _require_owner(request)
    count = services.vehicles_pause_all(owner=request.user, paused=pause)
    cars = f"{count} car{'s' if count != 1 else ''}"
    messages.info(request, f"{cars} paused: their work was withdrawn." if pause else f"{cars} available again.")
    return redirect("owner-dashboard")


@login_required
def vehicle_detail(request, pk):
    vehicle = _owner_car(request, pk)
    now = timezone.now()
    snapshot = portal.car_snapshot(vehicle=vehicle, now=now)
    if request.GET.get("fragment") == "live":
        return render(request, "fleet/_car_live.html", {"car": snapshot})
    pairing = request.session.get("pairing")
    if pairing and pairing.get("vehicle") == vehicle.pk:
        del request.session["pairing"]
    else:
        pairing = None
    new_token = request.session.get("new_token")
    if new_token and new_token.get("vehicle") == vehicle.pk:
        del request.session["new_token"]
    else:
        new_token = None
    policy = vehicle.policy
    series = portal.daily_series(vehicle=vehicle, tz=policy.timezone, now=now)
    return render(request, "fleet/car_detail.html", {
        "car": snapshot, "vehicle": vehicle, "policy": policy, "pairing": pairing, "new_token": new_token,
        "agent_server": _agent_server(request), "chart": portal.usage_chart(series), "series": series,
        "windows": [portal.window_text(w) for w in policy.windows],
        "departures": [{**d, "day": portal.WEEKDAY_NAMES[d["weekday"]]} for d in policy.departures],
        "categories": [name for code, name, _ in workloads.categories() if code in policy.categories],
        "blocked": policy.blocked_organisations.order_by("name"),
        "standing": portal.car_standing(vehicle=vehicle),
    })


@login_required
def vehicle_limits(request, pk):
    vehicle = _owner_car(request, pk)
    form = LimitsForm(request.POST if request.method == "POST" else None, vehicle=vehicle,
                      prices=portal.recent_clearing_prices())
    if request.method == "POST" and form.is_valid():
        fields, blocked = form.changes()
        try:
            policy = services.policy_update(vehicle=vehicle, blocked_organisations=blocked, **fields)
        except ValidationFailed as exc:
            form.add_service_errors(exc)
        else:
            submitted = sorted(fields["windows"], key=lambda w: (w["weekday"], w["start"]))
            text = "Limits saved; they apply now."
            if submitted != policy.windows:
                merged = ", ".join(portal.window_text(w, short=True) for w in policy.windows)
                text += f" Overlapping windows were merged: {merged}."
            messages.success(request, text)
            return redirect("vehicle-limits", pk=vehicle.pk)
    if form.has_errors:
        messages.error(request, form.service_error or "The limits were not saved: please correct the marked fields.")
    return render(request, "fleet/car_limits.html", {"vehicle": vehicle, "form": form, "policy": vehicle.policy})


@login_required
@require_POST
def vehicle_pause(request, pk, pause: bool):
    vehicle = _owner_car(request, pk)
    services.policy_update(vehicle=vehicle, paused=pause)
    messages.info(request, f"{vehicle.name} is {'paused: its work was withdrawn' if pause else 'available again'}.")
    return _back(request, reverse("owner-dashboard"))


@login_required
@require_POST
def vehicle_pairing_code(request, pk):
    vehicle = _owner_car(request, pk)
    request.session["pairing"] = {"vehicle": vehicle.pk, "code": services.pairing_code_issue(vehicle=vehicle)}
    return _back(request, reverse("owner-dashboard"))


@login_required
@require_POST
def vehicle_token_rotate(request, pk):
    vehicle = _owner_car(request, pk)
    request.session["new_token"] = {"vehicle": vehicle.pk, "token": services.vehicle_token_rotate(vehicle=vehicle)}
    messages.success(request, f"{vehicle.name} has a new device token; the old one stopped working.")
    return redirect("vehicle-detail", pk=vehicle.pk)


@login_required
@require_POST
def vehicle_token_revoke(request, pk):
    vehicle = _owner_car(request, pk)
    services.vehicle_token_revoke(vehicle=vehicle)
    messages.info(request, f"{vehicle.name}'s device token is revoked: the car was disconnected and its work went "
                           "back to the queue. Pair it again with a new pairing code to reconnect it.")
    return redirect("vehicle-detail", pk=vehicle.pk)


@login_required
def vehicle_remove(request, pk):
    """GET: the confirmation step; POST: remove the car (its history stays)."""
    vehicle = _owner_car(request, pk)
    if request.method == "POST":
        services.vehicle_remove(vehicle=vehicle)
        messages.info(request, f"{vehicle.name} is removed. Its history and earnings stay in your account.")
        return redirect("owner-dashboard")
    return render(request, "fleet/car_remove.html", {"vehicle": vehicle,
                                                     "units_done": vehicle.units_completed.count()})
