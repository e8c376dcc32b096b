from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Prefetch, QuerySet

from fleet import eligibility
from fleet.models import HardwareThroughput, Vehicle


def vehicle_ineligibility(*, vehicle: Vehicle, now: datetime) -> str | None:
    """The eligibility rule applied to a vehicle row (its policy and live state)."""
    policy = vehicle.policy
    return eligibility.ineligibility(
        policy=eligibility.Policy(battery_floor_pct=policy.battery_floor_pct, wifi_only=policy.wifi_only,
                                  paused=policy.paused),
        state=eligibility.LiveState(connected=vehicle.connected, last_seen_at=vehicle.last_seen_at,
                                    battery_pct=vehicle.battery_pct, driving=vehicle.driving,
                                    plugged_in=vehicle.plugged_in, on_wifi=vehicle.on_wifi),
        now=now,
        stale_after=timedelta(seconds=settings.VEHICLE_STALE_AFTER_S),
    )


def vehicle_status(*, vehicle: Vehicle, now: datetime, working: bool) -> tuple[str, str]:
    """(status, human explanation) for pages: offline, driving, paused, limited, working or idle."""
    reason = vehicle_ineligibility(vehicle=vehicle, now=now)
    if reason in (eligibility.OFFLINE, eligibility.PAUSED, eligibility.DRIVING):
        return reason, eligibility.REASONS[reason]
    if reason:
        return "limited", eligibility.REASONS[reason]
    return ("working", "Computing for buyers") if working else ("idle", "Parked, waiting for work")


def vehicles_offering(*, precision: str, now: datetime) -> list[tuple[Vehicle, int]]:
    """Connected, eligible cars whose hardware runs ``precision``, with the mega-ops per second each can
    deliver: its measured figure, capped by the hardware's nominal peak."""
    candidates = (
        Vehicle.objects.filter(connected=True, removed_at=None, hardware__throughputs__precision=precision)
        .select_related("policy", "hardware")
        .prefetch_related(Prefetch("hardware__throughputs", queryset=HardwareThroughput.objects.filter(precision=precision),
                                   to_attr="nominal"))
        .order_by("pk")
    )
    offering = []
    for vehicle in candidates:
        if vehicle_ineligibility(vehicle=vehicle, now=now):
            continue
        measured = int(vehicle.throughput_mops.get(precision, 0))
        nominal = vehicle.hardware.nominal[0].gops_per_s * 1000
        if measured > 0:
            offering.append((vehicle, min(measured, nominal)))
    return offering


def vehicles_of(*, owner) -> QuerySet[Vehicle]:
    """An owner's cars (removed ones excluded); every owner page and endpoint is scoped through this."""
    return Vehicle.objects.filter(owner=owner, removed_at=None).select_related("policy", "hardware")
