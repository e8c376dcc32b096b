"""Capacity is proven, not declared (docs/vehicle-protocol.md, "Capacity is measured"): the auction offers only
cars that ask for work, at the rate they delivered; capacity left unused is taken up by cars that ask; a car
that wastes what it won, or delivers far below its hardware class, is sold less."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from fleet import selectors, services
from fleet.models import HardwareGeneration, Vehicle, VehicleRate, WorkUnit
from marketplace import flows
from marketplace.models import Allocation, AuctionRound
from tests.factories import VehicleFactory
from tests.support.capacity import deliver
from tests.test_hot_path_queries import result_for

pytestmark = pytest.mark.django_db

HW4_NOMINAL_MOPS = 245_000 * 1000


def rate_of(car, precision="int8") -> int:
    car = Vehicle.objects.select_related("hardware").prefetch_related("hardware__throughputs", "rates").get(pk=car.pk)
    return selectors.vehicle_mops_per_s(vehicle=car, precision=precision)


def offers_of(auction_round: AuctionRound) -> dict[int, int]:
    return {offer["id"]: offer["quantity"] for offer in auction_round.journal["offers"]}


def test_a_car_that_claims_the_nominal_peak_and_never_asks_for_work_is_not_offered_and_an_honest_car_gets_the_work(
        make_job):
    # Given a car whose hello claims HW4's nominal peak and that never sends work.request, and an honest car
    job = make_job(docs=64, price=3_000_000)
    liar = VehicleFactory(throughput_mops={"int8": HW4_NOMINAL_MOPS}, work_requested_at=None)
    honest = VehicleFactory(throughput_mops={"int8": 20_000})

    # When the auction clears
    (auction_round,) = flows.auction_tick()

    # Then only the car that asked is offered and allocated, and it gets the work at once
    assert set(offers_of(auction_round)) == {honest.pk}
    assert set(Allocation.objects.values_list("vehicle_id", flat=True)) == {honest.pk}
    units, reason = flows.units_lease(vehicle_id=honest.pk)
    assert units and reason == "" and {u.job_id for u in units} == {job.pk}
    assert flows.units_lease(vehicle_id=liar.pk) == ([], "no_work")


def test_a_car_that_asked_long_ago_and_delivered_nothing_since_is_not_offered(make_job):
    make_job(docs=64)
    stale = VehicleFactory(work_requested_at=timezone.now() - timedelta(seconds=settings.CAPACITY_ASKED_WITHIN_S + 1))
    working = VehicleFactory(work_requested_at=None)
    deliver(working, mops_per_s=20_000)  # a car that just had a result accepted wants work, too

    (auction_round,) = flows.auction_tick()

    assert set(offers_of(auction_round)) == {working.pk} and stale.pk not in offers_of(auction_round)


def test_the_gateway_batch_records_work_requests_in_one_write_per_car():
    car = VehicleFactory(work_requested_at=None)
    at = timezone.now()
    services.vehicles_asked_record(asked={car.pk: at})
    assert Vehicle.objects.get(pk=car.pk).work_requested_at == at


def test_a_new_car_is_sold_at_the_provisional_figure_and_its_hello_may_only_lower_it(make_job):
    make_job(docs=400, price=3_000_000)
    new = VehicleFactory(throughput_mops={"int8": HW4_NOMINAL_MOPS})
    modest = VehicleFactory(throughput_mops={"int8": 2_000})

    assert rate_of(new) == settings.CAPACITY_PROVISIONAL_MOPS_PER_S
    assert rate_of(modest) == 2_000
    (auction_round,) = flows.auction_tick()
    assert offers_of(auction_round) == {
        new.pk: int(settings.CAPACITY_PROVISIONAL_MOPS_PER_S * settings.AUCTION_INTERVAL_S),
        modest.pk: int(2_000 * settings.AUCTION_INTERVAL_S)}


def test_the_measured_rate_follows_delivered_work_and_the_declared_hello_cannot_raise_it():
    car = VehicleFactory(throughput_mops={"int8": HW4_NOMINAL_MOPS})
    t = timezone.now()
    # Four units of 20,000 Mops leased together at t and finished one a second: 80,000 Mops in 4 s of work,
    # 20,000 Mops/s (dividing each unit by its own lease would make it 8,000 Mops/s).
    for k in range(1, 5):
        services.vehicle_rate_record(vehicle_id=car.pk, precision="int8", mops=20_000, duration_ms=k * 1000,
                                     now=t + timedelta(seconds=k))
    assert rate_of(car) == 20_000
    # Idle time changes nothing; slower work since pulls the rate down, weighted towards the recent.
    for k in range(1, 61):
        services.vehicle_rate_record(vehicle_id=car.pk, precision="int8", mops=10_000, duration_ms=1000,
                                     now=t + timedelta(seconds=600 + k))
    assert 10_000 < rate_of(car) < 0.5 * (10_000 + 20_000)
    # The hello's claim lowers it, never raises it.
    Vehicle.objects.filter(pk=car.pk).update(throughput_mops={"int8": 5_000})
    assert rate_of(car) == 5_000


def test_completing_units_through_the_flow_records_what_the_car_delivered(make_job):
    make_job(docs=64)
    car = VehicleFactory()
    flows.auction_tick()
    (unit, *_), _ = flows.units_lease(vehicle_id=car.pk)
    assert flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                               result=result_for(unit)) == (True, "")
    row = VehicleRate.objects.get(vehicle=car, precision="int8")
    assert (row.units, row.mops) == (1, unit.mops) and row.busy_s >= 0 and row.delivered_at is not None
    assert rate_of(car) == round(unit.mops / max(row.busy_s, settings.CAPACITY_MIN_BUSY_S))
    # A refused result proves nothing.
    (other, *_), _ = flows.units_lease(vehicle_id=car.pk)
    assert flows.unit_complete(vehicle_id=car.pk, unit_id=other.pk, epoch=other.lease_epoch,
                               result=[])[0] is False
    assert VehicleRate.objects.get(pk=row.pk).units == 1


def age_the_tick(seconds: float) -> None:
    AuctionRound.objects.update(cleared_at=timezone.now() - timedelta(seconds=seconds))


def test_capacity_a_car_leaves_unused_is_taken_up_by_another_car_that_asks(make_job):
    # Given a round that sold all its demand to a holder, and a car that asked only after it cleared
    job = make_job(docs=16, price=3_000_000)
    holder = VehicleFactory()
    deliver(holder, mops_per_s=200_000)
    taker = VehicleFactory(work_requested_at=None, policy__reserve_price_micros=100_000)
    flows.auction_tick()
    (allocation,) = Allocation.objects.all()
    assert allocation.vehicle_id == holder.pk

    # While the tick is young the holder keeps its capacity
    assert flows.units_lease(vehicle_id=taker.pk) == ([], "no_work")

    # When the holder leaves it unused (it neither asks nor delivers) past CAPACITY_RECLAIM_AFTER_S
    idle = settings.CAPACITY_RECLAIM_AFTER_S + 1
    age_the_tick(idle)
    Vehicle.objects.filter(pk=holder.pk).update(work_requested_at=timezone.now() - timedelta(seconds=idle))
    VehicleRate.objects.filter(vehicle=holder).update(delivered_at=timezone.now() - timedelta(seconds=idle))
    units, reason = flows.units_lease(vehicle_id=taker.pk)

    # Then the taker leases its units, at the allocation's price, drawn from the holder's remainder
    assert units and reason == ""
    assert {u.job_id for u in units} == {job.pk} and {u.price_micros for u in units} == {allocation.price_micros}
    assert 100_000 <= allocation.price_micros <= job.max_price_micros
    left = Allocation.objects.get(pk=allocation.pk).remaining_mops
    assert left == allocation.remaining_mops - sum(u.mops for u in units)
    # and a holder that holds a unit of it is using it: nobody else takes from it
    third = VehicleFactory(work_requested_at=None)
    WorkUnit.objects.filter(pk=units[0].pk).update(leased_to=holder)
    assert flows.units_lease(vehicle_id=third.pk) == ([], "no_work")


def test_unused_capacity_is_not_taken_below_the_takers_reserve(make_job):
    make_job(docs=16, price=3_000_000)
    holder = VehicleFactory(policy__reserve_price_micros=100_000)
    dear = VehicleFactory(work_requested_at=None, policy__reserve_price_micros=5_000_000)
    flows.auction_tick()
    age_the_tick(settings.CAPACITY_RECLAIM_AFTER_S + 1)
    Vehicle.objects.filter(pk=holder.pk).update(work_requested_at=None)
    assert flows.units_lease(vehicle_id=dear.pk) == ([], "no_work")


def test_a_car_that_wastes_its_allocations_is_offered_less_until_it_uses_them(make_job):
    # Given a car that won capacity in a round and used none of it, and one that used all of its
    make_job(docs=400, price=3_000_000)
    waster = VehicleFactory()
    user = VehicleFactory()
    flows.auction_tick()
    assert {a.vehicle_id for a in Allocation.objects.all()} == {waster.pk, user.pk}
    while units := flows.units_lease(vehicle_id=user.pk)[0]:
        for unit in units:
            assert flows.unit_complete(vehicle_id=user.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                                       result=result_for(unit))[0]

    # When the next round clears
    (second,) = flows.auction_tick()

    # Then the waster's offer shrinks to CAPACITY_WASTE_FLOOR of its rate; the user's follows its delivered rate
    waster_rate = rate_of(waster)
    assert offers_of(second)[waster.pk] == int(max(1, int(waster_rate * settings.CAPACITY_WASTE_FLOOR))
                                               * settings.AUCTION_INTERVAL_S)
    assert offers_of(second)[user.pk] == int(rate_of(user) * settings.AUCTION_INTERVAL_S)
    assert selectors.standing_factor(allocated_mops=100, used_mops=80) == 1.0
    assert selectors.standing_factor(allocated_mops=100, used_mops=40) == pytest.approx(0.5)


def test_a_car_far_below_its_hardware_class_is_flagged_and_sold_at_its_measured_rate(make_job, client):
    # Given three HW4 cars that deliver what HW4 cars really deliver (far below the nominal 245 TOPS), and one
    # registered as HW4 that delivers like a slower computer
    peers = [VehicleFactory() for _ in range(3)]
    for peer, rate in zip(peers, (20_000, 21_000, 22_000), strict=True):
        deliver(peer, mops_per_s=rate, seconds=60)
    slow = VehicleFactory(throughput_mops={"int8": HW4_NOMINAL_MOPS})
    deliver(slow, mops_per_s=9_000, seconds=60)

    # When its hardware class is checked (the gateway does it for cars that ask for work)
    services.vehicles_asked_record(asked={}, check=[slow.pk, *(p.pk for p in peers)])

    # Then it alone is flagged, with a reason its owner can read,
    flagged = {v.pk: v for v in Vehicle.objects.filter(hardware_mismatch=True)}
    assert set(flagged) == {slow.pk}
    reason = flagged[slow.pk].hardware_mismatch_reason
    assert "9,000 Mops/s" in reason and "20,500 Mops/s" in reason and "HW4" in reason  # the median of all four
    # and it is sold at what it delivered, not at anything of its class
    make_job(docs=400, price=3_000_000)
    (auction_round,) = flows.auction_tick()
    assert offers_of(auction_round)[slow.pk] == int(9_000 * settings.AUCTION_INTERVAL_S)
    # its owner sees why on the car's page
    client.force_login(slow.owner)
    page = client.get(f"/owner/cars/{slow.pk}/")
    assert page.status_code == 200 and "9,000 Mops/s" in page.content.decode()
    # When it delivers like its class again, the flag is lifted
    deliver(slow, mops_per_s=21_000, seconds=600)
    services.vehicles_hardware_check(vehicle_ids=[slow.pk])
    assert not Vehicle.objects.get(pk=slow.pk).hardware_mismatch


def test_a_class_with_too_few_proven_cars_flags_nobody():
    lone = VehicleFactory(hardware=HardwareGeneration.objects.get(code="HW3"))
    deliver(lone, mops_per_s=1_000, seconds=60)
    services.vehicles_hardware_check(vehicle_ids=[lone.pk])
    assert not Vehicle.objects.get(pk=lone.pk).hardware_mismatch
