from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from billing.selectors import owner_earnings_minor
from fleet import services
from fleet.forms import VehicleForm
from fleet.models import HardwareGeneration
from fleet.selectors import vehicle_status, vehicles_of


def _require_owner(request) -> None:
    if not request.user.is_owner:
        raise PermissionDenied("This page is for car owners.")



@login_required
def owner_dashboard(request):
    _require_owner(request)
    form = VehicleForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        vehicle, code = services.vehicle_create(owner=request.user, name=form.cleaned_data["name"],
                                                hardware=form.cleaned_data["hardware"])
        request.session["pairing"] = {"vehicle": vehicle.pk, "code": code}
        messages.success(request, f"{vehicle.name} added. Pair its agent with the code below within 15 minutes.")
        return redirect("owner-dashboard")
    now = timezone.now()
    cars = []
    for vehicle in vehicles_of(owner=request.user):
        status, explanation = vehicle_status(vehicle=vehicle, now=now, working=vehicle.leases_held.exists())
        cars.append({"vehicle": vehicle, "status": status, "explanation": explanation,
                     "units_done": vehicle.units_completed.count()})
    return render(request, "fleet/owner_dashboard.html", {
        "cars": cars, "form": form, "units_total": sum(c["units_done"] for c in cars), "pairing": request.session.pop("pairing", None),
        "earnings_minor": owner_earnings_minor(owner=request.user),
        "hardware": HardwareGeneration.objects.prefetch_related("throughputs"),
    })


@login_required
@require_POST
def vehicle_pause(request, pk, pause: bool):
    _require_owner(request)
    vehicle = get_object_or_404(vehicles_of(owner=request.user), pk=pk)
    services.policy_update(vehicle=vehicle, paused=pause)
    messages.info(request, f"{vehicle.name} is {'paused: its work was withdrawn' if pause else 'available again'}.")
    return redirect("owner-dashboard")


@login_required
@require_POST
def vehicle_pairing_code(request, pk):
    _require_owner(request)
    vehicle = get_object_or_404(vehicles_of(owner=request.user), pk=pk)
    request.session["pairing"] = {"vehicle": vehicle.pk, "code": services.pairing_code_issue(vehicle=vehicle)}
    return redirect("owner-dashboard")
