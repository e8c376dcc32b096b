from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import Prefetch, Q, QuerySet, Sum

from fleet import eligibility
from fleet.models import HardwareThroughput, OwnerPolicy, Vehicle, VehicleDailyUsage


def _hhmm(value: str) -> time:
    return time.fromisoformat(value)


def policy_rules(*, policy: OwnerPolicy, vehicle: Vehicle) -> eligibility.Policy:
    """The owner's stored limits as the eligibility rule's input."""
    return eligibility.Policy(
        paused=policy.paused, battery_floor_pct=policy.battery_floor_pct, battery_resume_pct=policy.battery_resume_pct,
        wifi_only=policy.wifi_only, plugged_in_only=policy.plugged_in_only, timezone=policy.timezone,
        windows=tuple(eligibility.Window(w["weekday"], _hhmm(w["start"]), _hhmm(w["end"])) for w in policy.windows),
        departures=tuple(eligibility.Departure(d["weekday"], _hhmm(d["at"]), d["charge_pct"]) for d in policy.departures),
        one_off_departures=tuple(eligibility.OneOffDeparture(datetime.fromisoformat(d["at"]), d["charge_pct"])
                                 for d in policy.one_off_departures),
        daily_energy_kwh=policy.daily_energy_kwh, monthly_energy_kwh=policy.monthly_energy_kwh,
        daily_data_mb=policy.daily_data_mb, max_temp_c=policy.max_temp_c,
        battery_kwh=vehicle.battery_kwh, work_kw=vehicle.hardware.watts / 1000,
    )


def vehicle_usage(*, vehicle: Vehicle, tz: str, now: datetime) -> eligibility.Usage:
    """Energy and data the car used in its owner's current day and month."""
    from billing.models import MeterRecord

    local = now.astimezone(ZoneInfo(tz))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = midnight.replace(day=1)
    records = MeterRecord.objects.filter(vehicle=vehicle, created_at__gte=month_start)
    totals = records.aggregate(month=Sum("energy_mwh"), today=Sum("energy_mwh", filter=Q(created_at__gte=midnight)))
    data = VehicleDailyUsage.objects.filter(vehicle=vehicle, day=local.date()).values_list("data_bytes", flat=True).first()
    return eligibility.Usage(energy_today_kwh=(totals["today"] or 0) / 10**6, energy_month_kwh=(totals["month"] or 0) / 10**6,
                             data_today_mb=(data or 0) / 10**6)


def vehicle_decision(*, vehicle: Vehicle, now: datetime) -> eligibility.Decision:
    """The eligibility rule applied to a vehicle row: its policy, its live state and its usage."""
    policy = vehicle.policy
    return eligibility.decide(
        policy=policy_rules(policy=policy, vehicle=vehicle),
        state=eligibility.LiveState(connected=vehicle.connected, last_seen_at=vehicle.last_seen_at,
                                    battery_pct=vehicle.battery_pct, driving=vehicle.driving,
                                    plugged_in=vehicle.plugged_in, on_wifi=vehicle.on_wifi,
                                    charging_kw=vehicle.charging_kw, temp_c=vehicle.temp_c),
        usage=vehicle_usage(vehicle=vehicle, tz=policy.timezone, now=now),
        now=now,
        stale_after=timedelta(seconds=settings.VEHICLE_STALE_AFTER_S),
        battery_hold=vehicle.battery_hold,
    )


def vehicle_consents(*, vehicle: Vehicle, job_category: str, organisation_id: int) -> bool:
    """The owner's consent rule for one job (fleet.eligibility.consents) on a vehicle row."""
    policy = vehicle.policy
    return eligibility.consents(categories=policy.categories,
                                blocked_organisations={o.pk for o in policy.blocked_organisations.all()},
                                job_category=job_category, organisation_id=organisation_id)


def vehicle_ineligibility(*, vehicle: Vehicle, now: datetime) -> str | None:
    return vehicle_decision(vehicle=vehicle, now=now).reason


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
        .prefetch_related("policy__blocked_organisations", Prefetch("hardware__throughputs", queryset=HardwareThroughput.objects.filter(precision=precision),
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
