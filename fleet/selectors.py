from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from billing.models import MeterRecord
from fleet import dispatch, eligibility
from fleet.models import OwnerPolicy, Vehicle, VehicleDailyUsage, VehicleRate, WorkUnit
from marketplace.models import Allocation, Job


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


def vehicle_data_left_bytes(*, vehicle: Vehicle, now: datetime) -> int | None:
    """Bytes the car may still move today under its owner's data budget (None: no budget)."""
    budget_mb = vehicle.policy.daily_data_mb
    if budget_mb is None:
        return None
    used = vehicle_usage(vehicle=vehicle, tz=vehicle.policy.timezone, now=now).data_today_mb
    return max(0, int((budget_mb - used) * 10**6))


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
    unit_s = dispatch.unit_seconds(unit_mops=dispatch.REFERENCE_UNIT_MOPS, result_bytes=dispatch.REFERENCE_UNIT_RESULT_BYTES,
                                   mops_per_s=max(rates, default=1), uplink_kbps=vehicle.uplink_kbps)
    limit = dispatch.inflight_limit(unit_s=unit_s, max_inflight=settings.MAX_INFLIGHT_PER_CAR)
    return dispatch.inflight_after_strikes(limit=limit, strikes=vehicle_recent_strikes(vehicle=vehicle))


def vehicle_recent_strikes(*, vehicle: Vehicle) -> int:
    """The strikes (leases that ran out without a result) the car still carries (fleet.dispatch.strikes_standing)."""
    since = None if vehicle.lease_strike_at is None else (timezone.now() - vehicle.lease_strike_at).total_seconds()
    return dispatch.strikes_standing(strikes=vehicle.lease_strikes, since_s=since, forgive_s=settings.LEASE_STRIKE_FORGIVE_S)


def rate_proven(*, row: VehicleRate) -> float | None:
    """Mega-ops per second a car delivered (docs/vehicle-protocol.md, "Capacity is measured"): the weighted
    mega-ops of its accepted results over the weighted time it worked on them, that time counted as at least
    CAPACITY_MIN_BUSY_S (so that one quick first unit proves no more than its mega-ops per second); None
    when it delivered nothing."""
    if not row.units or row.mops <= 0:
        return None
    return row.mops / max(row.busy_s, settings.CAPACITY_MIN_BUSY_S)


def vehicle_rate_proven(*, vehicle: Vehicle, precision: str) -> float | None:
    """The car's delivered rate at ``precision`` (its ``rates`` prefetched, or one query), None if none."""
    row = next((r for r in vehicle.rates.all() if r.precision == precision), None)
    return None if row is None else rate_proven(row=row)


def vehicle_mops_per_s(*, vehicle: Vehicle, precision: str) -> int:
    """Mega-ops per second the car is taken to deliver at ``precision``: what it delivered (rate_proven), or
    CAPACITY_PROVISIONAL_MOPS_PER_S while it delivered nothing there; lowered, never raised, by the throughput
    its hello claims; never above its hardware's nominal peak; 0 if the hardware cannot run it. The auction
    sells it, the dispatcher sizes batches and lease lifetimes with it."""
    nominal = next((t.gops_per_s * 1000 for t in vehicle.hardware.throughputs.all() if t.precision == precision), 0)
    if nominal <= 0:
        return 0
    proven = vehicle_rate_proven(vehicle=vehicle, precision=precision)
    figure = settings.CAPACITY_PROVISIONAL_MOPS_PER_S if proven is None else proven
    declared = int(vehicle.throughput_mops.get(precision, 0) or 0)
    if declared > 0:
        figure = min(figure, declared)
    return max(1, round(min(figure, nominal)))


def vehicles_standing(*, vehicle_ids: list[int], now: datetime) -> dict[int, float]:
    """The factor each car's offer is scaled by for the capacity it won and left unused: of the mega-ops
    allocated to it in the last CAPACITY_STANDING_WINDOW_S (jobs still open), the share it used itself (units
    of those allocations it completed or holds; what other cars took from it, or nobody did, is unused).
    At or above CAPACITY_USED_SHARE_OK it is 1; below, ``share / CAPACITY_USED_SHARE_OK``, at least
    CAPACITY_WASTE_FLOOR. A car with no allocation in the window: 1. One query."""
    if not vehicle_ids:
        return {}
    since = now - timedelta(seconds=settings.CAPACITY_STANDING_WINDOW_S)
    used = (WorkUnit.objects.filter(allocation=OuterRef("pk"))
            .filter(Q(state=WorkUnit.State.DONE, completed_by=OuterRef("vehicle_id"))
                    | Q(state=WorkUnit.State.LEASED, leased_to=OuterRef("vehicle_id")))
            .order_by().values("allocation").annotate(total=Sum("mops")).values("total"))
    rows = (Allocation.objects.filter(vehicle_id__in=vehicle_ids, round__cleared_at__gte=since,
                                      job__state__in=Job.OPEN_STATES)
            .annotate(used=Subquery(used)).values_list("vehicle_id", "mops", "used"))
    allocated: dict[int, int] = {}
    taken: dict[int, int] = {}
    for vehicle_id, mops, used_mops in rows:
        allocated[vehicle_id] = allocated.get(vehicle_id, 0) + mops
        taken[vehicle_id] = taken.get(vehicle_id, 0) + min(mops, used_mops or 0)
    return {pk: standing_factor(allocated_mops=allocated.get(pk, 0), used_mops=taken.get(pk, 0)) for pk in vehicle_ids}


def standing_factor(*, allocated_mops: int, used_mops: int) -> float:
    """vehicles_standing's rule for one car."""
    if allocated_mops <= 0:
        return 1.0
    share = used_mops / allocated_mops
    return max(settings.CAPACITY_WASTE_FLOOR, min(1.0, share / settings.CAPACITY_USED_SHARE_OK))


def asking_since(since: datetime) -> Q:
    """Cars that sent work.request, or had a result accepted, since ``since``: the cars that want work."""
    delivered = VehicleRate.objects.filter(vehicle=OuterRef("pk"), delivered_at__gte=since)
    return Q(work_requested_at__gte=since) | Q(Exists(delivered))


def vehicle_runs(*, vehicle: Vehicle, ai_model) -> bool:
    """Whether the car's agent runs a model's runtime and workload (as its last hello said)."""
    return ai_model.runtime in vehicle.runtimes and ai_model.task in vehicle.tasks


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
    """Connected, eligible cars whose hardware runs ``precision`` and that asked for work (or delivered) in
    the last CAPACITY_ASKED_WITHIN_S, with the mega-ops per second each is sold at (vehicle_mops_per_s: what
    it delivered, scaled by its standing, vehicles_standing) and the seconds it can still work
    (fleet.eligibility.work_time_left; None: unbounded), so that no car sells time it will not be parked for
    nor capacity it has not proven or does not want to use."""
    since = now - timedelta(seconds=settings.CAPACITY_ASKED_WITHIN_S)
    candidates = (
        Vehicle.objects.filter(asking_since(since), connected=True, removed_at=None, suspended_at=None,
                               hardware__throughputs__precision=precision)
        .select_related("policy", "hardware")
        .prefetch_related("policy__blocked_organisations", "hardware__throughputs", "rates")
        .order_by("pk")
    )
    offering = []
    for vehicle in candidates:
        decision, time_left = vehicle_outlook(vehicle=vehicle, now=now)
        if decision.reason or not int(vehicle.throughput_mops.get(precision, 0)):
            continue
        offering.append((vehicle, vehicle_mops_per_s(vehicle=vehicle, precision=precision), time_left))
    standing = vehicles_standing(vehicle_ids=[vehicle.pk for vehicle, _, _ in offering], now=now)
    return [(vehicle, max(1, int(rate * standing[vehicle.pk])), time_left) for vehicle, rate, time_left in offering]


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
