"""Sizing a car's work (fleet.dispatch) and the time it can still work (fleet.eligibility.work_time_left):
pure rules, then the dispatcher applying them to a car."""

from datetime import UTC, datetime, time, timedelta

import pytest
from hypothesis import given, strategies as st

from fleet import dispatch, eligibility, services as fleet
from fleet.models import Vehicle, WorkUnit
from marketplace import flows
from marketplace.models import Allocation
from tests.factories import VehicleFactory

MONDAY_NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PARKED = eligibility.LiveState(connected=True, last_seen_at=MONDAY_NOON, battery_pct=80.0, driving=False,
                               plugged_in=False, on_wifi=True)


def test_a_slow_link_makes_a_unit_take_longer():
    fast = dispatch.unit_seconds(unit_mops=24_000, result_bytes=16384, mops_per_s=100_000, uplink_kbps=500_000)
    slow = dispatch.unit_seconds(unit_mops=24_000, result_bytes=16384, mops_per_s=100_000, uplink_kbps=1_000)
    assert fast == pytest.approx(0.24, rel=0.01)
    assert slow - fast == pytest.approx((3072 * 16 / 3 + 200) * 8 / 1e6, rel=0.01)  # 131 ms more on 1 Mbit/s


def test_the_inflight_limit_is_pipeline_seconds_of_work_within_bounds():
    assert dispatch.inflight_limit(unit_s=1.0, max_inflight=32) == 4
    assert dispatch.inflight_limit(unit_s=0.001, max_inflight=32) == 32  # a fast car is capped
    assert dispatch.inflight_limit(unit_s=60.0, max_inflight=32) == 1  # a slow one still gets one


@given(limit=st.integers(1, 32), held=st.integers(0, 40), unit_s=st.floats(0.001, 100),
       time_left=st.one_of(st.none(), st.floats(0, 10**6)))
def test_a_batch_never_exceeds_the_limit_nor_outlives_the_parking(limit, held, unit_s, time_left):
    count = dispatch.batch_size(limit=limit, held=held, unit_s=unit_s, time_left_s=time_left)
    assert 0 <= count <= max(0, limit - held)
    if time_left is not None:
        assert (held + count) * unit_s <= time_left * dispatch.PARKED_TIME_SHARE + 1e-9 or count == 0


def test_work_time_left_is_the_nearest_of_departure_window_battery_and_budget():
    policy = eligibility.Policy(battery_floor_pct=30, battery_kwh=75, work_kw=0.1)
    usage = eligibility.Usage()
    # 50 % of 75 kWh above the floor at 100 W: 375 hours.
    assert eligibility.work_time_left(policy=policy, state=PARKED, usage=usage, now=MONDAY_NOON) == pytest.approx(375 * 3600)
    charging = eligibility.LiveState(**{**PARKED.__dict__, "plugged_in": True, "charging_kw": 7.2})
    assert eligibility.work_time_left(policy=policy, state=charging, usage=usage, now=MONDAY_NOON) is None
    departs = eligibility.Policy(departures=(eligibility.Departure(0, time(12, 40), 50),), work_kw=0.1)
    assert eligibility.work_time_left(policy=departs, state=PARKED, usage=usage, now=MONDAY_NOON) == 40 * 60
    window = eligibility.Policy(windows=(eligibility.Window(0, time(9), time(13, 30)),), work_kw=0.1)
    assert eligibility.work_time_left(policy=window, state=PARKED, usage=usage, now=MONDAY_NOON) == 90 * 60
    budget = eligibility.Policy(daily_energy_kwh=0.5, work_kw=0.1)
    assert eligibility.work_time_left(policy=budget, state=PARKED, usage=eligibility.Usage(energy_today_kwh=0.4),
                                      now=MONDAY_NOON) == pytest.approx(3600)


def test_touching_windows_count_as_one_stretch():
    windows = eligibility.merge_windows((eligibility.Window(0, time(18), time(0)), eligibility.Window(1, time(0), time(6))))
    evening = datetime(2026, 11, 23, 20, 0, tzinfo=UTC)
    assert eligibility.window_end(windows, evening) == datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


@pytest.mark.django_db
def test_the_dispatcher_stops_at_the_cars_inflight_limit(make_job):
    job = make_job(docs=160)
    car = VehicleFactory(throughput_mops={"int8": 5_000})  # slow: seconds per unit
    flows.auction_tick()
    Allocation.objects.filter(vehicle=car).update(remaining_mops=10**9)  # plenty sold
    units, _ = flows.units_lease(vehicle_id=car.pk)
    limit = len(units)
    unit_s = dispatch.unit_seconds(unit_mops=dispatch.REFERENCE_UNIT_MOPS, result_bytes=dispatch.REFERENCE_UNIT_RESULT_BYTES,
                                   mops_per_s=5_000, uplink_kbps=None)  # what the car's welcome announced
    assert limit == dispatch.inflight_limit(unit_s=unit_s, max_inflight=32) < 8
    assert flows.units_lease(vehicle_id=car.pk) == ([], "lease_limit")
    assert [u.seq for u in units] == sorted(u.seq for u in units) == list(range(limit))  # in input order
    assert WorkUnit.objects.filter(job=job, state=WorkUnit.State.LEASED, leased_to=car).count() == limit


@pytest.mark.django_db
def test_a_car_about_to_leave_gets_no_work_it_could_not_finish(make_job):
    make_job(docs=16)
    car = VehicleFactory(throughput_mops={"int8": 5_000})
    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    fleet.policy_update(vehicle=car, one_off_departures=[{"at": soon, "charge_pct": 10}])
    flows.auction_tick()
    Allocation.objects.filter(vehicle=car).update(remaining_mops=10**9)
    assert flows.units_lease(vehicle_id=car.pk) == ([], "leaving_soon")
    assert Vehicle.objects.get(pk=car.pk).ineligible_reason == ""


@pytest.mark.django_db
def test_a_car_sells_only_the_time_it_will_still_be_parked(make_job, settings):
    settings.AUCTION_INTERVAL_S = 60
    make_job(docs=400)
    staying = VehicleFactory(throughput_mops={"int8": 5_000})
    leaving = VehicleFactory(throughput_mops={"int8": 5_000})
    soon = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()
    fleet.policy_update(vehicle=leaving, one_off_departures=[{"at": soon, "charge_pct": 10}])
    (auction_round,) = flows.auction_tick()
    offers = {o["id"]: o["quantity"] for o in auction_round.journal["offers"]}
    assert offers[staying.pk] == 5_000 * 60
    assert 5_000 * 15 < offers[leaving.pk] <= 5_000 * 20
