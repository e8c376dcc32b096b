"""The one eligibility rule (fleet.eligibility): each limit by example, and properties over random
policies, telemetry sequences and clocks, time zones and daylight-saving changes included."""

from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from fleet import eligibility as el

pytestmark = pytest.mark.pure  # no database, layer or broker: the same code in every profile

UTC = timezone.utc
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)  # a Thursday
STALE = timedelta(seconds=20)
POLICY = el.Policy()
STATE = el.LiveState(connected=True, last_seen_at=NOW, battery_pct=80, driving=False, plugged_in=True, on_wifi=True,
                     charging_kw=0.0, temp_c=25.0)
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata", "America/Santiago"]


def decide(policy=POLICY, state=STATE, usage=el.Usage(), now=NOW, hold=False):
    return el.decide(policy=policy, state=state, usage=usage, now=now, stale_after=STALE, battery_hold=hold)


def with_(obj, **changes):
    return type(obj)(**{**obj.__dict__, **changes})


def test_a_parked_charged_car_on_wifi_may_work():
    assert decide().ok


@pytest.mark.parametrize("policy, state, usage, reason", [
    (with_(POLICY, paused=True), STATE, el.Usage(), el.PAUSED),
    (POLICY, with_(STATE, connected=False), el.Usage(), el.OFFLINE),
    (POLICY, with_(STATE, last_seen_at=NOW - timedelta(seconds=21)), el.Usage(), el.OFFLINE),
    (POLICY, with_(STATE, battery_pct=None), el.Usage(), el.NO_TELEMETRY),
    (POLICY, with_(STATE, driving=True), el.Usage(), el.DRIVING),
    (POLICY, with_(STATE, battery_pct=30), el.Usage(), el.BATTERY_FLOOR),
    (with_(POLICY, max_temp_c=40), with_(STATE, temp_c=41), el.Usage(), el.TEMPERATURE),
    (with_(POLICY, max_temp_c=40), with_(STATE, temp_c=None), el.Usage(), el.TEMPERATURE),
    (with_(POLICY, windows=(el.Window(3, time(18), time(23)),)), STATE, el.Usage(), el.OUTSIDE_WINDOW),
    (with_(POLICY, daily_energy_kwh=1.0), STATE, el.Usage(energy_today_kwh=1.0), el.ENERGY_BUDGET),
    (with_(POLICY, monthly_energy_kwh=20.0), STATE, el.Usage(energy_month_kwh=20.5), el.ENERGY_BUDGET),
    (with_(POLICY, plugged_in_only=True), with_(STATE, plugged_in=False), el.Usage(), el.NOT_PLUGGED_IN),
    (POLICY, with_(STATE, on_wifi=False), el.Usage(), el.NOT_ON_WIFI),
    (with_(POLICY, daily_data_mb=50), STATE, el.Usage(data_today_mb=50), el.DATA_BUDGET),
    (with_(POLICY, one_off_departures=(el.OneOffDeparture(NOW + timedelta(hours=1), 80.0),)), STATE, el.Usage(),
     el.DEPARTURE_RESERVE),
])
def test_each_limit_alone_stops_work_with_its_reason(policy, state, usage, reason):
    decision = decide(policy, state, usage)
    assert decision.reason == reason and reason in el.REASONS


def test_cellular_is_fine_when_the_owner_did_not_ask_for_wifi_only():
    assert decide(with_(POLICY, wifi_only=False), with_(STATE, on_wifi=False)).ok


def test_a_window_past_midnight_covers_the_early_hours_of_the_next_day():
    night = (el.Window(2, time(22), time(6)),)  # Wednesday 22:00 to Thursday 06:00
    policy = with_(POLICY, windows=night)
    assert decide(policy, now=datetime(2026, 11, 26, 5, 59, tzinfo=UTC)).ok  # Thursday 05:59
    assert decide(policy, now=datetime(2026, 11, 26, 6, 0, tzinfo=UTC)).reason == el.OUTSIDE_WINDOW
    assert decide(policy, now=datetime(2026, 11, 25, 21, 59, tzinfo=UTC)).reason == el.OUTSIDE_WINDOW


def test_windows_follow_the_owners_clock_across_a_daylight_saving_change():
    # Berlin leaves summer time on Sunday 2026-10-25: 01:00 UTC is 03:00 local before the change and 02:00 after.
    policy = with_(POLICY, timezone="Europe/Berlin", windows=(el.Window(6, time(2, 30), time(4)),))
    assert decide(policy, now=datetime(2026, 10, 25, 0, 45, tzinfo=UTC)).ok  # 02:45 CEST
    assert decide(policy, now=datetime(2026, 10, 25, 1, 45, tzinfo=UTC)).ok  # 02:45 CET (the hour repeats)
    assert decide(policy, now=datetime(2026, 10, 25, 3, 0, tzinfo=UTC)).reason == el.OUTSIDE_WINDOW  # 04:00 CET


def test_a_departure_in_a_skipped_hour_is_taken_at_the_earlier_instant():
    # New York skips 02:00-03:00 on 2026-03-08. A 02:30 departure reads as 07:30 UTC with the old offset and
    # 06:30 UTC with the new one; the earlier, 06:30 UTC, is the one the car must be ready for.
    tz = ZoneInfo("America/New_York")
    assert el.wall_clock_instant(datetime(2026, 3, 8).date(), time(2, 30), tz) == datetime(2026, 3, 8, 6, 30, tzinfo=UTC)


def test_the_next_recurring_departure_is_found_in_the_owners_time_zone():
    policy = with_(POLICY, timezone="Asia/Kolkata", departures=(el.Departure(4, time(8, 15), 70.0),))
    at, pct = el.next_departure(policy, NOW)
    assert at == datetime(2026, 11, 27, 2, 45, tzinfo=UTC) and pct == 70.0  # Friday 08:15 IST


def test_charging_counts_toward_the_departure_charge():
    leaving = with_(POLICY, one_off_departures=(el.OneOffDeparture(NOW + timedelta(hours=4), 85.0),))
    assert decide(leaving, with_(STATE, plugged_in=True, charging_kw=0.0)).reason == el.DEPARTURE_RESERVE
    assert decide(leaving, with_(STATE, plugged_in=True, charging_kw=7.2)).ok


# --- properties -------------------------------------------------------------------------------------

instants = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31),
                        timezones=st.just(UTC))
times = st.times().map(lambda t: t.replace(microsecond=0))
windows = st.lists(st.builds(el.Window, st.integers(0, 6), times, times), max_size=4).map(tuple)
departures = st.lists(st.builds(el.Departure, st.integers(0, 6), times, st.floats(0, 100)), max_size=3).map(tuple)
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731


@st.composite
def policies(draw):
    floor = draw(st.floats(0, 90))
    return el.Policy(
        paused=draw(st.booleans()), battery_floor_pct=floor, battery_resume_pct=draw(st.floats(floor, 100)),
        wifi_only=draw(st.booleans()), plugged_in_only=draw(st.booleans()), timezone=draw(st.sampled_from(ZONES)),
        windows=draw(windows), departures=draw(departures),
        daily_energy_kwh=draw(maybe(st.floats(0, 20))), monthly_energy_kwh=draw(maybe(st.floats(0, 300))),
        daily_data_mb=draw(maybe(st.floats(0, 500))), max_temp_c=draw(maybe(st.floats(20, 60))),
        battery_kwh=draw(st.floats(40, 100)), work_kw=draw(st.floats(0.05, 1.0)))


states = st.builds(el.LiveState, connected=st.booleans(), last_seen_at=st.just(None), battery_pct=maybe(st.floats(0, 100)),
                   driving=st.booleans(), plugged_in=st.booleans(), on_wifi=st.booleans(),
                   charging_kw=st.floats(0, 11), temp_c=maybe(st.floats(-20, 70)))
usages = st.builds(el.Usage, st.floats(0, 30), st.floats(0, 400), st.floats(0, 800))


def violations(policy, state, usage, now, hold) -> set[str]:
    """Independent restatement of every limit; each returns the reason it would give."""
    local = now.astimezone(ZoneInfo(policy.timezone))
    found = set()
    if policy.paused:
        found.add(el.PAUSED)
    if not state.connected or state.last_seen_at is None or now - state.last_seen_at > STALE:
        found.add(el.OFFLINE)
    if state.battery_pct is None:
        found.add(el.NO_TELEMETRY)
        return found
    if state.driving:
        found.add(el.DRIVING)
    if state.battery_pct <= policy.battery_floor_pct or (hold and state.battery_pct <= policy.battery_resume_pct):
        found.add(el.BATTERY_FLOOR)
    if policy.max_temp_c is not None and (state.temp_c is None or state.temp_c > policy.max_temp_c):
        found.add(el.TEMPERATURE)
    if policy.windows and not any(
            (w.start < w.end and local.weekday() == w.weekday and w.start <= local.time().replace(tzinfo=None) < w.end)
            or (w.start >= w.end and ((local.weekday() == w.weekday and local.time().replace(tzinfo=None) >= w.start)
                                      or (local.weekday() == (w.weekday + 1) % 7 and local.time().replace(tzinfo=None) < w.end)))
            for w in policy.windows):
        found.add(el.OUTSIDE_WINDOW)
    if (policy.daily_energy_kwh is not None and usage.energy_today_kwh >= policy.daily_energy_kwh) or (
            policy.monthly_energy_kwh is not None and usage.energy_month_kwh >= policy.monthly_energy_kwh):
        found.add(el.ENERGY_BUDGET)
    if policy.plugged_in_only and not state.plugged_in:
        found.add(el.NOT_PLUGGED_IN)
    if policy.wifi_only and not state.on_wifi:
        found.add(el.NOT_ON_WIFI)
    if policy.daily_data_mb is not None and usage.data_today_mb >= policy.daily_data_mb:
        found.add(el.DATA_BUDGET)
    if not el.keeps_departure_charge(policy, state, now):
        found.add(el.DEPARTURE_RESERVE)
    return found


@settings(deadline=None)
@given(policies(), states, usages, instants, st.integers(0, 40), st.booleans())
def test_work_is_allowed_exactly_when_no_limit_is_violated(policy, state, usage, now, age_s, hold):
    state = with_(state, last_seen_at=now - timedelta(seconds=age_s))
    decision = decide(policy, state, usage, now, hold)
    found = violations(policy, state, usage, now, hold)
    assert decision.ok == (not found)
    assert decision.reason is None or decision.reason in found


@settings(deadline=None)
@given(st.floats(0, 90), st.floats(0.5, 10), st.lists(st.floats(-3, 3), min_size=1, max_size=200), st.floats(0, 100))
def test_the_battery_hysteresis_never_flip_flops(floor, gap, steps, start):
    policy = with_(POLICY, battery_floor_pct=floor, battery_resume_pct=min(100.0, floor + gap))
    battery, hold, blocked_before = start, False, None
    for step in steps:
        battery = min(100.0, max(0.0, battery + step))
        decision = decide(policy, with_(STATE, battery_pct=battery), hold=hold)
        hold = decision.battery_hold
        blocked = decision.reason == el.BATTERY_FLOOR
        if blocked_before is not None and blocked != blocked_before:
            # It stops only at or below the floor, and resumes only above the resume level.
            assert battery <= floor if blocked else battery > policy.battery_resume_pct
        blocked_before = blocked


@settings(deadline=None)
@given(start_pct=st.floats(0, 100), need_pct=st.floats(0, 100), hours=st.floats(0.1, 48),
       charging_kw=st.floats(0, 11), plugged=st.booleans(), work_kw=st.floats(0.05, 1.5),
       step_min=st.floats(0.5, 10), zone=st.sampled_from(ZONES), now=instants)
def test_working_never_leaves_less_charge_at_departure_than_the_owner_needs(start_pct, need_pct, hours, charging_kw,
                                                                           plugged, work_kw, step_min, zone, now):
    # Simulate the car to its departure, checking the rule at least every look-ahead and working when allowed.
    kwh = 75.0
    departure = now + timedelta(hours=hours)
    policy = with_(POLICY, timezone=zone, work_kw=work_kw, battery_kwh=kwh, battery_floor_pct=0, battery_resume_pct=0,
                   one_off_departures=(el.OneOffDeparture(departure, need_pct),))
    battery = idle = start_pct / 100 * kwh
    clock = now
    while clock < departure:
        step = min(timedelta(minutes=step_min), departure - clock)
        state = with_(STATE, last_seen_at=clock, battery_pct=battery / kwh * 100, plugged_in=plugged,
                      charging_kw=charging_kw)
        works = decide(policy, state, now=clock).ok
        gain = charging_kw * step.total_seconds() / 3600 if plugged else 0.0
        battery = min(kwh, battery + gain - (work_kw * step.total_seconds() / 3600 if works else 0.0))
        idle = min(kwh, idle + gain)
        clock += step
    # At departure the car holds what the owner asked for, or, if even never working could not reach it,
    # exactly what it would have held had it never worked.
    assert battery >= min(need_pct / 100 * kwh, idle) - 1e-9


minute_times = st.builds(time, st.integers(0, 23), st.integers(0, 59))


@settings(deadline=None)
@given(st.lists(st.builds(el.Window, st.integers(0, 6), minute_times, minute_times), min_size=1, max_size=6),
       st.lists(st.integers(0, 7 * 1440 - 1), min_size=20, max_size=20))
def test_merging_windows_keeps_the_same_availability_without_overlaps(windows, minutes):
    merged = el.merge_windows(windows)
    monday = datetime(2026, 11, 23, tzinfo=UTC)
    for minute in minutes:
        moment = monday + timedelta(minutes=minute)
        assert el.in_windows(tuple(windows), moment) == el.in_windows(merged, moment)
    # No two merged windows overlap: each minute of the week is covered at most once.
    covered = [0] * (7 * 1440)
    for w in merged:
        start = w.weekday * 1440 + w.start.hour * 60 + w.start.minute
        length = ((w.end.hour * 60 + w.end.minute) - (w.start.hour * 60 + w.start.minute)) % 1440 or 1440
        for m in range(start, start + length):
            covered[m % (7 * 1440)] += 1
    assert max(covered) <= 1


def test_overlapping_windows_are_merged_into_one():
    merged = el.merge_windows([el.Window(0, time(18), time(22)), el.Window(0, time(21), time(23, 30)),
                               el.Window(0, time(23, 30), time(6))])
    assert merged == (el.Window(0, time(18), time(6)),)
