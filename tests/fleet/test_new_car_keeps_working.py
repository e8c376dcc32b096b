"""A new owner's only car, with a big job waiting, keeps working (tests/browser/test_owner_portal.py saw it sit
idle): the dispatcher never leases beyond the in-flight limit the car's welcome announced (the car releases the
rest, and the capacity drawn for them is lost), and a result held for its check is capacity the car used."""

import pytest
from django.conf import settings
from django.utils import timezone

from fleet.agent.client import encode_embeddings
from fleet.agent.models import get_runner
from fleet.models import Lease, WorkUnit
from fleet.selectors import standing_factor, vehicle_inflight_limit, vehicles_standing
from marketplace import flows
from marketplace.models import Allocation
from tests.factories import VehicleFactory
from tests.support.capacity import deliver


@pytest.mark.django_db
def test_the_dispatcher_never_leases_beyond_the_limit_the_welcome_announced(make_job):
    make_job(docs=160)
    car = VehicleFactory(policy__reserve_price_micros=0)
    deliver(car, mops_per_s=50_000)  # proven since its hello, which announced one lease
    assert vehicle_inflight_limit(vehicle=car) > 1
    flows.auction_tick()
    Allocation.objects.filter(vehicle=car).update(remaining_mops=10**9)  # plenty sold
    units, _ = flows.units_lease(vehicle_id=car.pk, inflight_limit=1)
    assert len(units) == 1
    assert flows.units_lease(vehicle_id=car.pk, inflight_limit=1) == ([], "lease_limit")


@pytest.mark.django_db
def test_results_of_a_new_car_checked_by_the_platform_count_as_capacity_it_used(make_job, verifying):
    make_job(docs=16)
    car = VehicleFactory(policy__reserve_price_micros=0)  # its owner's only car: the platform checks it
    deliver(car, mops_per_s=5_000)
    flows.auction_tick()
    units, _ = flows.units_lease(vehicle_id=car.pk)
    assert units
    runner = get_runner("all-minilm-l6-v2", "int8")
    for unit in units:
        assert flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                                   result=encode_embeddings(runner.embed([d["text"] for d in unit.inputs])))[0]
    assert set(WorkUnit.objects.filter(pk__in=[u.pk for u in units]).values_list("verify", flat=True)) == {"arbiter"}
    for unit in units:
        assert flows.unit_arbitrate(unit_id=unit.pk)
    assert set(Lease.objects.filter(vehicle=car).values_list("verdict", flat=True)) == {Lease.Verdict.RIGHT}
    # The units are done by the car, from its allocation: what it won, it used (before, the check cut the
    # link, and a new car, whose first results are all checked, was sold at CAPACITY_WASTE_FLOOR of its rate).
    done = WorkUnit.objects.filter(pk__in=[u.pk for u in units], state=WorkUnit.State.DONE, completed_by=car)
    assert done.filter(allocation__vehicle=car).count() == len(units)
    allocation = Allocation.objects.get(vehicle=car)
    used = min(allocation.mops, sum(u.mops for u in units))
    expected = standing_factor(allocated_mops=allocation.mops, used_mops=used)
    assert vehicles_standing(vehicle_ids=[car.pk], now=timezone.now()) == {car.pk: expected}
    assert expected > settings.CAPACITY_WASTE_FLOOR
