"""Leases are bounded whatever the car says (docs/vehicle-protocol.md, "Leases are bounded"): a heartbeat never
extends a lease past its deadline, a lease that runs out is a strike that halves the car's in-flight limit, and
a car that takes work and sits on it does not stall the job."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.utils import timezone
from hypothesis import given, strategies as st

from fleet import dispatch, services
from fleet.models import Lease, Vehicle, WorkUnit
from fleet.selectors import vehicle_inflight_limit
from marketplace import flows
from tests.factories import VehicleFactory
from tests.support.capacity import deliver


@pytest.mark.pure
@given(work_s=st.floats(0, 10**6), ttl_s=st.integers(1, 120), max_s=st.integers(1, 3600))
def test_a_lease_lives_at_most_the_operators_bound_and_at_least_one_ttl(work_s, ttl_s, max_s):
    lifetime = dispatch.lease_lifetime_s(work_s=work_s, ttl_s=ttl_s, max_s=max_s)
    assert ttl_s <= lifetime <= max(ttl_s, max_s)
    assert lifetime >= min(max_s, dispatch.LEASE_LIFETIME_FACTOR * work_s)  # the car's own time, and then some


@pytest.mark.pure
def test_each_strike_halves_the_inflight_limit_down_to_one():
    assert [dispatch.inflight_after_strikes(limit=32, strikes=n) for n in range(8)] == [32, 16, 8, 4, 2, 1, 1, 1]
    assert dispatch.inflight_after_strikes(limit=3, strikes=1) == 1


@pytest.mark.pure
def test_a_strike_is_forgiven_every_forgive_period_after_the_last():
    assert [dispatch.strikes_standing(strikes=3, since_s=s, forgive_s=30) for s in (0, 29, 30, 61, 90, 10**6)] == [
        3, 3, 2, 1, 0, 0]
    assert dispatch.strikes_standing(strikes=5, since_s=None, forgive_s=30) == 0


@pytest.mark.django_db
def test_heartbeats_do_not_extend_a_lease_past_its_deadline_and_running_out_is_a_strike(make_job):
    make_job(docs=64)
    car = VehicleFactory(policy__reserve_price_micros=0)
    deliver(car, mops_per_s=50_000)  # proven: its in-flight limit is above one lease, so a strike can halve it
    limit = vehicle_inflight_limit(vehicle=car)
    flows.auction_tick()
    units, _ = flows.units_lease(vehicle_id=car.pk)
    held = [(u.pk, u.lease_epoch) for u in units]
    deadline = units[0].lease_deadline_at
    assert deadline is not None and deadline - units[0].leased_at <= timedelta(seconds=300)

    # Heartbeats long after the deadline (the car says it still works on them) extend only up to it.
    services.leases_reconcile(held_by={car.pk: held}, lost_by={}, now=deadline + timedelta(minutes=10))
    assert set(WorkUnit.objects.filter(pk__in=[pk for pk, _ in held]).values_list("lease_expires_at", flat=True)) == {
        deadline}

    # The deadline has passed: the sweep takes the units back, whatever the car says.
    WorkUnit.objects.filter(pk__in=[pk for pk, _ in held]).update(lease_deadline_at=timezone.now() - timedelta(seconds=1))
    services.leases_reconcile(held_by={car.pk: held}, lost_by={}, now=timezone.now())
    assert services.leases_sweep() == len(held)
    assert set(Lease.objects.filter(vehicle=car).values_list("outcome", "reason")) == {("expired", "lease_deadline")}
    car.refresh_from_db()
    assert car.lease_strikes == 1  # one per sweep that found its leases run out, however many
    assert vehicle_inflight_limit(vehicle=car) == dispatch.inflight_after_strikes(limit=limit, strikes=1) < limit

    # One strike is forgiven every LEASE_STRIKE_FORGIVE_S after the last: after long enough, none is left, and
    # the next one starts the count again.
    Vehicle.objects.filter(pk=car.pk).update(lease_strike_at=timezone.now() - timedelta(hours=2))
    car.refresh_from_db()
    assert vehicle_inflight_limit(vehicle=car) == limit
    services.vehicle_strikes_add(vehicle_id=car.pk, strikes=1, now=timezone.now())
    car.refresh_from_db()
    assert car.lease_strikes == 1


@pytest.mark.django_db(transaction=True)
def test_a_car_that_heartbeats_its_work_and_never_answers_loses_it_at_the_deadline(settings, make_job):
    """Given a car that leases units over the gateway and then only heartbeats them, never sending a result:
    at the deadline the sweep takes them back (the car is told, reason lease_deadline), they are queued for
    other cars, and the car may hold half as many."""
    from tests.fleet.test_gateway import online, receive_type, send

    settings.LEASE_MAX_LIFETIME_S = 3
    settings.LEASE_TTL_S = 2  # heartbeats are written once a second: the TTL outlives the gap between flushes
    job = make_job(docs=8 * 12)
    car = VehicleFactory(policy__reserve_price_micros=0)
    deliver(car, mops_per_s=200_000)  # proven fast, so that it may hold several leases at once
    token = services.vehicle_pair(code=services.pairing_code_issue(vehicle=car))[1]

    async def scenario():
        comm = await online(token)
        await sync_to_async(flows.auction_tick)()
        await send(comm, "work.request")
        first = [await receive_type(comm, "unit.assign")]
        while len(first) < await sync_to_async(WorkUnit.objects.filter(leased_to=car).count)():
            first.append(await receive_type(comm, "unit.assign"))
        held = [[a["unit_id"], a["epoch"]] for a in first]
        for _ in range(10):  # it says it holds them, every 0.5 s, and never answers
            await send(comm, "heartbeat", leases=held)
            await asyncio.sleep(0.5)
            await sync_to_async(services.leases_sweep)()
        withdrawn = await receive_type(comm, "unit.withdraw")
        assert withdrawn["reason"] == "lease_deadline" and [withdrawn["unit_id"], withdrawn["epoch"]] in held
        await comm.disconnect()
        return len(first)

    first = async_to_sync(scenario)()
    assert first > 1
    assert Lease.objects.filter(vehicle=car, reason="lease_deadline").count() == first  # every one, at the bound
    assert job.units.filter(state="queued").count() == job.units_total  # all back in the queue
    car.refresh_from_db()
    struck = vehicle_inflight_limit(vehicle=car)
    car.lease_strikes = 0
    assert struck == max(1, vehicle_inflight_limit(vehicle=car) // 2)
