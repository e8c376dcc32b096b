"""The one eligibility rule: may this car take (or keep) work right now? Pure Python, no ORM.

The gateway checks it on every telemetry message and before every lease; the auction uses it to count
offered capacity. :func:`decide` returns the first reason the car may not work (or ``None``) and the new
state of the battery hysteresis, which the caller stores with the car.
"""

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

PAUSED = "paused"
OFFLINE = "offline"
NO_TELEMETRY = "no_telemetry"
DRIVING = "driving"
BATTERY_FLOOR = "battery_floor"
DEPARTURE_RESERVE = "departure_reserve"
TEMPERATURE = "temperature"
OUTSIDE_WINDOW = "outside_window"
ENERGY_BUDGET = "energy_budget"
NOT_PLUGGED_IN = "not_plugged_in"
NOT_ON_WIFI = "not_on_wifi"
DATA_BUDGET = "data_budget"

REASONS = {
    PAUSED: "Paused by the owner",
    OFFLINE: "Offline",
    NO_TELEMETRY: "Waiting for the car's first status report",
    DRIVING: "Driving",
    BATTERY_FLOOR: "Battery below the owner's floor (resumes above the resume level)",
    DEPARTURE_RESERVE: "Keeping the charge the owner needs for the next departure",
    TEMPERATURE: "Too warm (or no temperature reading) for the owner's limit",
    OUTSIDE_WINDOW: "Outside the owner's availability windows",
    ENERGY_BUDGET: "The owner's energy budget for today or this month is used up",
    NOT_PLUGGED_IN: "Not plugged in (the owner allows work only while plugged in)",
    NOT_ON_WIFI: "Not on WiFi (the owner allows WiFi only)",
    DATA_BUDGET: "The owner's daily data budget is used up",
}

#: An owner's battery limits until they set their own (OwnerPolicy's defaults come from here): stop work at or
#: below the floor, and once stopped resume only above the resume level.
DEFAULT_BATTERY_FLOOR_PCT = 30
DEFAULT_BATTERY_RESUME_PCT = 35

#: How far ahead the departure check looks: longer than any lease, and than the gap between two checks.
DEPARTURE_LOOKAHEAD = timedelta(minutes=10)
#: Departures further ahead than this are not considered (the weekly schedule repeats).
DEPARTURE_HORIZON_DAYS = 8


@dataclass(frozen=True)
class Window:
    """Available from ``start`` to ``end`` on ``weekday`` (0 is Monday) in the owner's time zone; an ``end``
    at or before ``start`` runs past midnight into the next day."""

    weekday: int
    start: time
    end: time


@dataclass(frozen=True)
class Departure:
    """A recurring departure (``weekday`` and local time ``at``) with the charge the owner needs then."""

    weekday: int
    at: time
    charge_pct: float


@dataclass(frozen=True)
class OneOffDeparture:
    at: datetime  # aware
    charge_pct: float


@dataclass(frozen=True)
class Policy:
    paused: bool = False
    battery_floor_pct: float = float(DEFAULT_BATTERY_FLOOR_PCT)
    battery_resume_pct: float = float(DEFAULT_BATTERY_RESUME_PCT)
    wifi_only: bool = True
    plugged_in_only: bool = False
    timezone: str = "UTC"
    windows: tuple[Window, ...] = ()  # empty: any time
    departures: tuple[Departure, ...] = ()
    one_off_departures: tuple[OneOffDeparture, ...] = ()
    daily_energy_kwh: float | None = None
    monthly_energy_kwh: float | None = None
    daily_data_mb: float | None = None
    max_temp_c: float | None = None
    battery_kwh: float = 75.0  # the car's usable capacity
    work_kw: float = 0.1  # the car computer's draw while working


@dataclass(frozen=True)
class LiveState:
    connected: bool
    last_seen_at: datetime | None
    battery_pct: float | None
    driving: bool
    plugged_in: bool
    on_wifi: bool
    charging_kw: float = 0.0
    temp_c: float | None = None


@dataclass(frozen=True)
class Usage:
    """What the car has used in the owner's current day and month."""

    energy_today_kwh: float = 0.0
    energy_month_kwh: float = 0.0
    data_today_mb: float = 0.0


@dataclass(frozen=True)
class Decision:
    reason: str | None
    battery_hold: bool

    @property
    def ok(self) -> bool:
        return self.reason is None


def wall_clock_instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The instant a local wall-clock time happens. A time skipped by a daylight-saving change, or one that
    happens twice, resolves to the earlier candidate, so a departure is never taken later than meant."""
    candidates = [datetime.combine(day, at, tzinfo=tz).replace(fold=fold) for fold in (0, 1)]
    return min(c.astimezone(ZoneInfo("UTC")) for c in candidates)


def in_windows(windows: tuple[Window, ...], local: datetime) -> bool:
    if not windows:
        return True
    now_t, today = local.time().replace(tzinfo=None), local.weekday()
    for w in windows:
        if w.start < w.end:
            if today == w.weekday and w.start <= now_t < w.end:
                return True
        elif (today == w.weekday and now_t >= w.start) or (today == (w.weekday + 1) % 7 and now_t < w.end):
            return True
    return False


MINUTES_PER_DAY, MINUTES_PER_WEEK = 1440, 7 * 1440


def merge_windows(windows: tuple[Window, ...] | list[Window]) -> tuple[Window, ...]:
    """The same weekly availability with overlapping or touching windows merged, in weekday order. A
    window's ``end`` equal to its ``start`` means a full 24 hours."""
    intervals = []
    for w in windows:
        start = w.weekday * MINUTES_PER_DAY + w.start.hour * 60 + w.start.minute
        length = ((w.end.hour * 60 + w.end.minute) - (w.start.hour * 60 + w.start.minute)) % MINUTES_PER_DAY
        end = start + (length or MINUTES_PER_DAY)
        if end > MINUTES_PER_WEEK:  # past Sunday midnight: split into the end and the start of the week
            intervals += [(start, MINUTES_PER_WEEK), (0, end - MINUTES_PER_WEEK)]
        else:
            intervals.append((start, end))
    merged: list[list[int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if len(merged) > 1 and merged[0][0] == 0 and merged[-1][1] == MINUTES_PER_WEEK:  # joins across Sunday night
        merged[-1][1] = MINUTES_PER_WEEK + merged.pop(0)[1]
    result = []
    for start, end in merged:
        while start < end:  # windows of at most 24 hours
            chunk = min(end - start, MINUTES_PER_DAY)
            day, minute = divmod(start % MINUTES_PER_WEEK, MINUTES_PER_DAY)
            stop = (minute + chunk) % MINUTES_PER_DAY
            result.append(Window(day, time(minute // 60, minute % 60), time(stop // 60, stop % 60)))
            start += chunk
    return tuple(sorted(result, key=lambda w: (w.weekday, w.start)))


def next_departure(policy: Policy, now: datetime) -> tuple[datetime, float] | None:
    """The earliest departure after ``now`` (recurring or one-off) and the charge needed then."""
    return min(_departures(policy, now), default=None, key=lambda item: (item[0], -item[1]))


def keeps_departure_charge(policy: Policy, state: LiveState, now: datetime) -> bool:
    """Whether the car can work for the look-ahead and still, with only the charging it is doing now, hold
    the charge the owner needs at every departure in the horizon."""
    have_kwh = state.battery_pct / 100 * policy.battery_kwh
    for at, pct in _departures(policy, now):
        hours = (at - now).total_seconds() / 3600
        charged = min(have_kwh + (state.charging_kw * hours if state.plugged_in else 0.0), policy.battery_kwh)
        work = policy.work_kw * min(DEPARTURE_LOOKAHEAD.total_seconds() / 3600, hours)
        if charged - work < pct / 100 * policy.battery_kwh:
            return False
    return True


def _departures(policy: Policy, now: datetime):
    """Every departure after ``now`` within the horizon, as (instant, charge needed)."""
    if not policy.departures and not policy.one_off_departures:
        return
    tz = ZoneInfo(policy.timezone)
    yield from ((d.at, d.charge_pct) for d in policy.one_off_departures if d.at > now)
    today = now.astimezone(tz).date()
    for offset in range(DEPARTURE_HORIZON_DAYS):
        day = today + timedelta(days=offset)
        for d in policy.departures:
            if d.weekday == day.weekday() and (instant := wall_clock_instant(day, d.at, tz)) > now:
                yield instant, d.charge_pct


def window_end(windows: tuple[Window, ...], local: datetime) -> datetime | None:
    """When the availability that includes ``local`` ends (following windows that touch), or None for no
    windows (any time). ``local`` must be inside a window; the result is in ``local``'s time zone."""
    if not windows:
        return None
    end = local
    for _ in range(8):  # a week of touching 24-hour windows is always available
        later = None
        for w in windows:
            for day in (end.date() - timedelta(days=1), end.date()):
                if day.weekday() != w.weekday:
                    continue
                start = datetime.combine(day, w.start, tzinfo=local.tzinfo)
                stop = datetime.combine(day + timedelta(days=w.end <= w.start), w.end, tzinfo=local.tzinfo)
                if start <= end < stop and (later is None or stop > later):
                    later = stop
        if later is None:
            return end
        end = later
    return None


def work_time_left(*, policy: Policy, state: LiveState, usage: Usage, now: datetime) -> float | None:
    """Seconds this car can still work from ``now`` before a limit stops it (the next departure, the end of
    its availability window, the battery reaching the floor, an energy budget), or None when nothing ahead
    bounds it. The dispatcher sizes a car's work to this, so that work rarely outlives the parking."""
    bounds = []
    if (departure := next_departure(policy, now)) is not None:
        bounds.append((departure[0] - now).total_seconds())
    local = now.astimezone(ZoneInfo(policy.timezone))
    if (end := window_end(policy.windows, local)) is not None:
        bounds.append((end - local).total_seconds())
    drain_kw = policy.work_kw - (state.charging_kw if state.plugged_in else 0.0)
    if state.battery_pct is not None and drain_kw > 0:
        above_floor_kwh = max(0.0, state.battery_pct - policy.battery_floor_pct) / 100 * policy.battery_kwh
        bounds.append(above_floor_kwh / drain_kw * 3600)
    for budget, used in ((policy.daily_energy_kwh, usage.energy_today_kwh),
                         (policy.monthly_energy_kwh, usage.energy_month_kwh)):
        if budget is not None and policy.work_kw > 0:
            bounds.append(max(0.0, budget - used) / policy.work_kw * 3600)
    return max(0.0, min(bounds)) if bounds else None


def consents(*, categories: tuple[str, ...] | list[str], blocked_organisations: set[int] | frozenset[int],
             job_category: str, organisation_id: int) -> bool:
    """Whether the owner lets the car run a job: its workload category is allowed (an empty list allows
    every category) and its buyer is not on the owner's block list."""
    return (not categories or job_category in categories) and organisation_id not in blocked_organisations


def decide(*, policy: Policy, state: LiveState, usage: Usage, now: datetime, stale_after: timedelta,
           battery_hold: bool = False) -> Decision:
    """The first limit that stops the car working now, if any, and the new battery hysteresis state:
    once the battery falls to the floor the car holds off until it is above the resume level."""
    if state.battery_pct is not None:
        battery_hold = state.battery_pct <= policy.battery_floor_pct or (
            battery_hold and state.battery_pct <= policy.battery_resume_pct)

    def stop(reason: str | None) -> Decision:
        return Decision(reason, battery_hold)

    if policy.paused:
        return stop(PAUSED)
    if not state.connected or state.last_seen_at is None or now - state.last_seen_at > stale_after:
        return stop(OFFLINE)
    if state.battery_pct is None:
        return stop(NO_TELEMETRY)
    if state.driving:
        return stop(DRIVING)
    if battery_hold:
        return stop(BATTERY_FLOOR)
    if not keeps_departure_charge(policy, state, now):
        return stop(DEPARTURE_RESERVE)
    if policy.max_temp_c is not None and (state.temp_c is None or state.temp_c > policy.max_temp_c):
        return stop(TEMPERATURE)
    if not in_windows(policy.windows, now.astimezone(ZoneInfo(policy.timezone))):
        return stop(OUTSIDE_WINDOW)
    if (policy.daily_energy_kwh is not None and usage.energy_today_kwh >= policy.daily_energy_kwh) or (
            policy.monthly_energy_kwh is not None and usage.energy_month_kwh >= policy.monthly_energy_kwh):
        return stop(ENERGY_BUDGET)
    if policy.plugged_in_only and not state.plugged_in:
        return stop(NOT_PLUGGED_IN)
    if policy.wifi_only and not state.on_wifi:
        return stop(NOT_ON_WIFI)
    if policy.daily_data_mb is not None and usage.data_today_mb >= policy.daily_data_mb:
        return stop(DATA_BUDGET)
    return stop(None)
