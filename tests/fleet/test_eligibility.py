"""The one eligibility rule (fleet.eligibility): each limit alone, and a property over random states."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from fleet import eligibility as el

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
STALE = timedelta(seconds=20)
OK_POLICY = el.Policy(battery_floor_pct=30, wifi_only=True, paused=False)
OK_STATE = el.LiveState(connected=True, last_seen_at=NOW, battery_pct=80, driving=False, plugged_in=False, on_wifi=True)


def check(policy=OK_POLICY, state=OK_STATE, now=NOW):
    return el.ineligibility(policy=policy, state=state, now=now, stale_after=STALE)


def test_a_parked_charged_car_on_wifi_may_work():
    assert check() is None


@pytest.mark.parametrize("policy, state, reason", [
    (el.Policy(30, True, True), OK_STATE, el.PAUSED),
    (OK_POLICY, el.LiveState(**{**OK_STATE.__dict__, "driving": True}), el.DRIVING),
    (OK_POLICY, el.LiveState(**{**OK_STATE.__dict__, "battery_pct": 30}), el.BATTERY_FLOOR),
    (OK_POLICY, el.LiveState(**{**OK_STATE.__dict__, "on_wifi": False}), el.NOT_ON_WIFI),
    (OK_POLICY, el.LiveState(**{**OK_STATE.__dict__, "connected": False}), el.OFFLINE),
    (OK_POLICY, el.LiveState(**{**OK_STATE.__dict__, "last_seen_at": NOW - timedelta(seconds=21)}), el.OFFLINE),
    (OK_POLICY, el.LiveState(**{**OK_STATE.__dict__, "battery_pct": None}), el.NO_TELEMETRY),
])
def test_each_limit_alone_stops_work_with_its_reason(policy, state, reason):
    assert check(policy, state) == reason


def test_cellular_is_fine_when_the_owner_did_not_ask_for_wifi_only():
    assert check(el.Policy(30, False, False), el.LiveState(**{**OK_STATE.__dict__, "on_wifi": False})) is None


@given(
    floor=st.integers(0, 100), wifi_only=st.booleans(), paused=st.booleans(),
    connected=st.booleans(), age_s=st.integers(0, 60), battery=st.one_of(st.none(), st.floats(0, 100)),
    driving=st.booleans(), on_wifi=st.booleans(),
)
def test_work_is_allowed_exactly_when_no_limit_is_violated(floor, wifi_only, paused, connected, age_s, battery,
                                                           driving, on_wifi):
    policy = el.Policy(floor, wifi_only, paused)
    state = el.LiveState(connected, NOW - timedelta(seconds=age_s), battery, driving, False, on_wifi)
    violated = (paused or not connected or age_s > 20 or battery is None or driving or battery <= floor
                or (wifi_only and not on_wifi))
    reason = check(policy, state)
    assert (reason is None) == (not violated)
    assert reason is None or reason in el.REASONS
