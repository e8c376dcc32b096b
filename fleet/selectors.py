from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from billing.models import MeterRecord
from fleet import dispatch, eligibility
from fleet.models import OwnerPolicy, Vehicle, VehicleDailyUsage


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
    local = now.astimezone(ZoneInfo(tz))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = midnight.replace(day=1)
    records = MeterRecord.objects.filter(vehicle=vehicle, created_at__gte=month_start)
    totals = records.aggregate(month=Sum("energy_mwh"), today=Sum("energy_mwh", filter=Q(created_at__gte=midnight)))
    data = VehicleDailyUsage.objects.filter(vehicle=vehicle, day=local.date()).values_list("data_bytes", flat=True).first()
    return eligibility.Usage(energy_today_kwh=(totals["today"] or 0) / 10**6, energy_month_kwh=(totals["month"] or 0) / 10**6,
                             data_today_mb=(data or 0) / 10**6)


def vehicle_usage_if_limited(*, vehicle: Vehicle, rules: eligibility.Policy, now: datetime) -> eligibility.Usage:
    """The car's usage when a budget of its owner's depends on it; zero usage (no query) otherwise."""
    if rules.daily_energy_kwh is None and rules.monthly_energy_kwh is None and rules.daily_data_mb is None:
        return eligibility.Usage()
    return vehicle_usage(vehicle=vehicle, tz=rules.timezone, now=now)


def vehicle_live_state(*, vehicle: Vehicle) -> eligibility.LiveState:
    return eligibility.LiveState(connected=vehicle.connected, last_seen_at=vehicle.last_seen_at,
                                 battery_pct=vehicle.battery_pct, driving=vehicle.driving, plugged_in=vehicle.plugged_in,
                                 on_wifi=vehicle.on_wifi, charging_kw=vehicle.charging_kw, temp_c=vehicle.temp_c)


def vehicle_decide(*, rules: eligibility.Policy, state: eligibility.LiveState, usage: eligibility.Usage,
                   now: datetime, battery_hold: bool) -> eligibility.Decision:
    """fleet.eligibility.decide with the configured staleness (the gateway calls it with cached inputs)."""
    return eligibility.decide(policy=rules, state=state, usage=usage, now=now,
                              stale_after=timedelta(seconds=settings.VEHICLE_STALE_AFTER_S), battery_hold=battery_hold)


def vehicle_outlook(*, vehicle: Vehicle, now: datetime) -> tuple[eligibility.Decision, float | None]:
    """The eligibility decision for a vehicle row (its policy, live state and usage) and the seconds it can
    still work (fleet.eligibility.work_time_left; None: unbounded)."""
    rules = policy_rules(policy=vehicle.policy, vehicle=vehicle)
    state = vehicle_live_state(vehicle=vehicle)
    usage = vehicle_usage_if_limited(vehicle=vehicle, rules=rules, now=now)
    decision = vehicle_decide(rules=rules, state=state, usage=usage, now=now, battery_hold=vehicle.battery_hold)
    return decision, eligibility.work_time_left(policy=rules, state=state, usage=usage, now=now)


def vehicle_decision(*, vehicle: Vehicle, now: datetime) -> eligibility.Decision:
    """The eligibility rule applied to a vehicle row: its policy, its live state and its usage."""
    return vehicle_outlook(vehicle=vehicle, now=now)[0]


@dataclass(frozen=True)
class GatewayView:
    """What a gateway connection keeps in memory about its car, to apply the eligibility rule to each
    telemetry message without a database read: refreshed at hello, after every state change it writes, when
    the owner's policy changes, and every GATEWAY_VIEW_REFRESH_S."""

    rules: eligibility.Policy
    usage: eligibility.Usage
    battery_hold: bool
    reason: str | None
    policy_updated_at: datetime
    max_inflight: int


def vehicle_gateway_view(*, vehicle: Vehicle, now: datetime, reason: str | None = None) -> GatewayView:
    """The gateway's view of a vehicle row (with ``policy`` and ``hardware`` loaded)."""
    rules = policy_rules(policy=vehicle.policy, vehicle=vehicle)
    usage = vehicle_usage_if_limited(vehicle=vehicle, rules=rules, now=now)
    if reason is None:
        reason = vehicle_decide(rules=rules, state=vehicle_live_state(vehicle=vehicle), usage=usage, now=now,
                                battery_hold=vehicle.battery_hold).reason
    return GatewayView(rules=rules, usage=usage, battery_hold=vehicle.battery_hold, reason=reason,
                       policy_updated_at=vehicle.policy.updated_at, max_inflight=vehicle_inflight_limit(vehicle=vehicle))


def vehicle_inflight_limit(*, vehicle: Vehicle) -> int:
    """The car's in-flight lease limit (fleet.dispatch) for the reference unit at its fastest precision (of
    those it measured, if it reported any), within the operator's MAX_INFLIGHT_PER_CAR, halved for each of its
    recent leases that ran out without a result. Announced in the welcome and enforced by the dispatcher."""
    precisions = list(vehicle.throughput_mops) or [t.precision for t in vehicle.hardware.throughputs.all()]
    rates = [vehicle_mops_per_s(vehicle=vehicle, precision=p) for p in precisions]
    unit_s = dispatch.unit_seconds(unit_mops=dispatch.REFERENCE_UNIT_MOPS, values=dispatch.REFERENCE_UNIT_VALUES,
                                   mops_per_s=max(rates, default=1), uplink_kbps=vehicle.uplink_kbps)
    limit = dispatch.inflight_limit(unit_s=unit_s, max_inflight=settings.MAX_INFLIGHT_PER_CAR)
    return dispatch.inflight_after_strikes(limit=limit, strikes=vehicle_recent_strikes(vehicle=vehicle))


def vehicle_recent_strikes(*, vehicle: Vehicle) -> int:
    """The strikes (leases that ran out without a result) the car still carries (fleet.dispatch.strikes_standing)."""
    since = None if vehicle.lease_strike_at is None else (timezone.now() - vehicle.lease_strike_at).total_seconds()
    return dispatch.strikes_standing(strikes=vehicle.lease_strikes, since_s=since, forgive_s=settings.LEASE_STRIKE_FORGIVE_S)


def vehicle_mops_per_s(*, vehicle: Vehicle, precision: str) -> int:
    """Mega-ops per second the car delivers at ``precision``: its measured figure (from its hello) capped by
    its hardware's nominal peak; the nominal peak when it measured none; 0 if the hardware cannot run it."""
    nominal = next((t.gops_per_s * 1000 for t in vehicle.hardware.throughputs.all() if t.precision == precision), 0)
    measured = int(vehicle.throughput_mops.get(precision, 0) or 0)
    return min(measured, nominal) if measured > 0 else nominal


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


def vehicles_offering(*, precision: str, now: datetime) -> list[tuple[Vehicle, int, float | None]]:
    """Connected, eligible cars whose hardware runs ``precision``, with the mega-ops per second each can
    deliver (its measured figure, capped by the hardware's nominal peak) and the seconds it can still work
    (fleet.eligibility.work_time_left; None: unbounded), so that no car sells time it will not be parked for."""
    candidates = (
        Vehicle.objects.filter(connected=True, removed_at=None, suspended_at=None,
                                hardware__throughputs__precision=precision)
        .select_related("policy", "hardware")
        .prefetch_related("policy__blocked_organisations", "hardware__throughputs")
        .order_by("pk")
    )
    offering = []
    for vehicle in candidates:
        decision, time_left = vehicle_outlook(vehicle=vehicle, now=now)
        if decision.reason or not int(vehicle.throughput_mops.get(precision, 0)):
            continue
        offering.append((vehicle, vehicle_mops_per_s(vehicle=vehicle, precision=precision), time_left))
    return offering


def vehicles_of(*, owner) -> QuerySet[Vehicle]:
    """An owner's cars (removed ones excluded); every owner page and endpoint is scoped through this."""
    return Vehicle.objects.filter(owner=owner, removed_at=None).select_related("policy", "hardware")


def standing_by_version_and_class() -> list[dict]:
    """Per agent version and hardware class, what the checks of the cars' results have shown (the operator's
    view, docs/verification.md): cars, results checked right and wrong, the wrong share, cars suspended."""
    rows = (Vehicle.objects.filter(removed_at=None).values("agent_version", "hardware__code")
            .annotate(cars=Count("pk"), passed=Sum("checks_passed"), wrong=Sum("wrong_results"),
                      suspended=Count("pk", filter=Q(suspended_at__isnull=False)))
            .order_by("-wrong", "agent_version", "hardware__code"))
    return [{**row, "wrong_share": (row["wrong"] or 0) / max(1, (row["passed"] or 0) + (row["wrong"] or 0))}
            for row in rows]
