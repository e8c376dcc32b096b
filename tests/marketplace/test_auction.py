"""Auction rounds against the database: who offers, what is allocated, replay, dispatch order, expiry."""

from dataclasses import asdict
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from fleet.models import HardwareGeneration, WorkUnit
from marketplace import flows, services
from marketplace.models import Allocation, AuctionRound, Job
from tests.factories import VehicleFactory
from tests.support.capacity import deliver

pytestmark = pytest.mark.django_db


def assert_replays(auction_round: AuctionRound) -> None:
    """Clearing the tick's journals again gives this round's price and fills exactly."""
    replay = services.round_replay(auction_round=auction_round)
    bids = {b["id"] for b in auction_round.journal["bids"]}
    assert replay.prices[auction_round.market] == auction_round.clearing_price_micros
    assert [asdict(f) for f in replay.fills if f.bid_id in bids] == auction_round.journal["fills"]


def test_a_round_allocates_eligible_cars_capacity_to_bids_and_replays_exactly(make_job):
    job = make_job(docs=400, price=3_000_000)
    cheap = VehicleFactory(policy__reserve_price_micros=100_000)
    dear = VehicleFactory(policy__reserve_price_micros=200_000)
    VehicleFactory(driving=True)  # ineligible: offers nothing
    VehicleFactory(policy__paused=True)
    VehicleFactory(policy__reserve_price_micros=5_000_000)  # reserve above every bid: offers, sells nothing

    (auction_round,) = flows.auction_tick()

    offers = {o["id"] for o in auction_round.journal["offers"]}
    assert offers == {cheap.pk, dear.pk, cheap.pk + 4}
    assert auction_round.journal["bids"] == [{"id": job.pk, "price": 3_000_000, "quantity": job.mops_total}]
    allocations = {a.vehicle_id: a for a in Allocation.objects.filter(round=auction_round)}
    assert set(allocations) <= {cheap.pk, dear.pk}
    for allocation in allocations.values():
        assert 200_000 <= allocation.price_micros == auction_round.clearing_price_micros <= 3_000_000
    # Each car sells at most what it can compute in the interval.
    for vehicle_id, allocation in allocations.items():
        assert allocation.mops <= 50_000 * settings.AUCTION_INTERVAL_S
    assert_replays(auction_round)


def test_a_car_in_two_markets_sells_each_second_of_the_interval_once(make_job):
    make_job(docs=400, precision="int8", price=3_000_000)
    make_job(docs=400, precision="fp32", price=2_000_000)
    car = VehicleFactory(throughput_mops={"int8": 20_000, "fp32": 2_000})
    deliver(car, precision="int8", mops_per_s=20_000)  # capacity is sold at what a car delivered
    deliver(car, precision="fp32", mops_per_s=2_000)

    rounds = flows.auction_tick()

    assert [r.market for r in rounds] == ["int8", "fp32"]  # highest bid first
    assert {r.cleared_at for r in rounds} == {rounds[0].cleared_at}  # one joint clearing
    seconds = sum(a.mops / car.throughput_mops[a.round.market] for a in Allocation.objects.filter(vehicle=car))
    assert seconds <= settings.AUCTION_INTERVAL_S + 1e-6
    for auction_round in rounds:
        assert_replays(auction_round)


def test_a_car_in_two_markets_sells_its_time_where_surplus_is_highest_not_to_the_highest_bid(make_job):
    # Given a car that does 20,000 Mops/s in INT8 and 10,000 in FP32 at a reserve of 0.1 $, and a job in each
    # market wanting more than the car can do: FP32 bids more per compute unit (0.4 $ against 0.3 $), but a
    # second in INT8 is worth 20,000 x (0.3 - 0.1) against 10,000 x (0.4 - 0.1) in FP32.
    int8 = make_job(docs=400, precision="int8", price=300_000)
    make_job(docs=400, precision="fp32", price=400_000)
    car = VehicleFactory(throughput_mops={"int8": 20_000, "fp32": 10_000}, policy__reserve_price_micros=100_000)
    deliver(car, precision="int8", mops_per_s=20_000)  # capacity is sold at what a car delivered
    deliver(car, precision="fp32", mops_per_s=10_000)

    rounds = {r.market: r for r in flows.auction_tick()}

    # Then the whole interval goes to INT8 (clearing the highest bid's market first would have sold it FP32),
    (allocation,) = Allocation.objects.filter(vehicle=car)
    assert (allocation.job_id, allocation.mops) == (int8.pk, 20_000 * settings.AUCTION_INTERVAL_S)
    # at INT8's bid (the demand left unmet sets it), while FP32 does not trade.
    assert rounds["int8"].clearing_price_micros == allocation.price_micros == 300_000
    assert rounds["fp32"].clearing_price_micros is None and rounds["fp32"].sold_mops == 0
    assert rounds["fp32"].journal["offers"] == [
        {"id": car.pk, "price": 100_000, "quantity": 10_000 * settings.AUCTION_INTERVAL_S}]
    for auction_round in rounds.values():
        assert_replays(auction_round)


def test_the_dispatcher_leases_only_sold_capacity_best_price_first(make_job):
    low = make_job(docs=16, price=1_000_000)
    high = make_job(docs=16, price=2_000_000)
    car = VehicleFactory()
    deliver(car, mops_per_s=50_000)  # proven: its batch is sized to its allocation, not to one provisional lease
    assert flows.units_lease(vehicle_id=car.pk) == ([], "no_work")  # nothing sold yet

    flows.auction_tick()
    units, _ = flows.units_lease(vehicle_id=car.pk)
    assert units and {u.job_id for u in units} == {high.pk} and {u.lease_epoch for u in units} == {1}
    assert {u.price_micros for u in units} == {AuctionRound.objects.get().clearing_price_micros}
    sold = Allocation.objects.get(vehicle=car, job=high)
    assert sum(u.mops for u in units[:-1]) < sold.mops <= sum(u.mops for u in units)  # leased while capacity was left
    assert low.units.filter(state=WorkUnit.State.LEASED).count() == 0
    rest, _ = flows.units_lease(vehicle_id=car.pk)  # the high bid's capacity is used up: the next job it won
    assert {u.job_id for u in rest} <= {low.pk}
    assert bool(rest) == Allocation.objects.filter(vehicle=car, job=low).exists()


def test_overdue_jobs_expire_and_their_leases_are_withdrawn(make_job):
    job = make_job(docs=16)
    car = VehicleFactory()
    flows.auction_tick()
    (unit, *_), _ = flows.units_lease(vehicle_id=car.pk)
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))

    assert flows.auction_tick() == []

    job.refresh_from_db()
    assert job.state == Job.State.EXPIRED
    assert set(job.units.values_list("state", flat=True)) == {WorkUnit.State.CANCELLED}
    assert unit.lease_history.get().outcome == "cancelled"


def test_no_round_is_recorded_without_demand():
    VehicleFactory(hardware=HardwareGeneration.objects.get(code="HW3"))
    assert flows.auction_tick() == [] and AuctionRound.objects.count() == 0


def test_owners_consent_is_respected_by_the_auction_and_the_dispatcher(make_job, buyer):
    job = make_job(docs=16, price=3_000_000)
    picky = VehicleFactory(policy__reserve_price_micros=0)
    picky.policy.blocked_organisations.add(buyer.organisation)
    no_embeddings = VehicleFactory(policy__categories=["text-generation"])
    willing = VehicleFactory(policy__reserve_price_micros=200_000)

    (auction_round,) = flows.auction_tick()

    assert {a.vehicle_id for a in Allocation.objects.filter(round=auction_round)} == {willing.pk}
    assert sorted(auction_round.journal["refused"]) == sorted([[job.pk, picky.pk], [job.pk, no_embeddings.pk]])
    assert_replays(auction_round)
    assert flows.units_lease(vehicle_id=picky.pk) == ([], "no_work")
    # Consent withdrawn after the round: the dispatcher checks again before leasing.
    willing.policy.blocked_organisations.add(buyer.organisation)
    assert flows.units_lease(vehicle_id=willing.pk) == ([], "no_work")
