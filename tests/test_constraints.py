"""The invariants the database holds itself (migrations *_invariants_in_the_database): each test writes past a
service, straight to the rows, and the database refuses."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from billing.models import LedgerTransaction, MeterRecord, Reservation
from fleet.models import Lease, WorkUnit
from marketplace import flows
from marketplace.models import Job
from tests.factories import VehicleFactory
from tests.test_hot_path_queries import complete_one, result_for

pytestmark = pytest.mark.django_db


def refused(write) -> bool:
    try:
        with transaction.atomic():
            write()
    except IntegrityError:
        return True
    return False


def test_a_reservation_never_draws_and_releases_more_than_it_reserved(make_job):
    reservation = Reservation.objects.get(job=make_job(docs=8))
    rows = Reservation.objects.filter(pk=reservation.pk)
    assert refused(lambda: rows.update(drawn_minor=reservation.amount_minor + 1))
    assert refused(lambda: rows.update(drawn_minor=1, released_minor=reservation.amount_minor))
    assert not refused(lambda: rows.update(drawn_minor=1, released_minor=reservation.amount_minor - 1))


def test_a_meter_records_owner_and_platform_shares_add_up_to_its_charge(make_job):
    unit = complete_one(make_job)
    record = MeterRecord.objects.get()
    with pytest.raises(TypeError):  # append-only in the ORM: not even a queryset's update
        MeterRecord.objects.filter(pk=record.pk).update(owner_femto=F("owner_femto") + 1)
    other = WorkUnit.objects.filter(job=unit.job).exclude(pk=unit.pk).first()

    def meter(owner_femto: int):
        txn = LedgerTransaction.objects.create(kind=LedgerTransaction.Kind.USAGE, description="test", currency="usd")
        MeterRecord.objects.create(unit=other, job=unit.job, vehicle=record.vehicle, owner=record.owner, tokens=1,
                                   mops=1, price_micros=1, currency="usd", fee_bps=0, charge_femto=10,
                                   owner_femto=owner_femto, platform_femto=2, energy_mwh=1, transaction=txn)

    assert refused(lambda: meter(7)) and not refused(lambda: meter(8))


def test_a_leased_unit_always_has_its_holder_and_expiry(make_job):
    job = make_job(docs=8)
    car = VehicleFactory()
    unit = WorkUnit.objects.filter(job=job).first()
    rows = WorkUnit.objects.filter(pk=unit.pk)
    later = timezone.now() + timedelta(minutes=1)
    assert refused(lambda: rows.update(state=WorkUnit.State.LEASED, leased_to=car, lease_expires_at=None))
    assert refused(lambda: rows.update(state=WorkUnit.State.LEASED, leased_to=None, lease_expires_at=later))
    assert not refused(lambda: rows.update(state=WorkUnit.State.LEASED, leased_to=car, lease_expires_at=later))


def test_a_unit_has_at_most_one_open_lease(make_job):
    job = make_job(docs=8)
    car = VehicleFactory()
    unit = WorkUnit.objects.filter(job=job).first()
    now = timezone.now()
    Lease.objects.create(unit=unit, vehicle=car, epoch=1, price_micros=1, started_at=now)
    assert refused(lambda: Lease.objects.create(unit=unit, vehicle=car, epoch=2, price_micros=1, started_at=now))
    Lease.objects.filter(unit=unit, epoch=1).update(outcome=Lease.Outcome.EXPIRED, ended_at=now)
    assert not refused(lambda: Lease.objects.create(unit=unit, vehicle=car, epoch=2, price_micros=1, started_at=now))


def test_a_jobs_units_done_never_exceed_its_units_total(make_job):
    job = make_job(docs=16)
    rows = Job.objects.filter(pk=job.pk)
    assert refused(lambda: rows.update(units_done=F("units_total") + 1))
    assert not refused(lambda: rows.update(units_done=F("units_total")))


def test_the_flows_keep_within_every_constraint_through_a_whole_job(make_job):
    """Given a job done unit by unit through the flows, then cancelled halfway: nothing the database refuses."""
    job = make_job(docs=32)
    car = VehicleFactory(policy__reserve_price_micros=1_000_000)
    flows.auction_tick()
    units, _ = flows.units_lease(vehicle_id=car.pk)
    for unit in units[:2]:
        assert flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                                   result=result_for(unit)) == (True, "")
    flows.job_cancel(job=job)
    reservation = Reservation.objects.get(job=job)
    assert reservation.status == Reservation.Status.RELEASED and reservation.remaining_minor == 0
    assert not Lease.objects.filter(unit__job=job, outcome=Lease.Outcome.ACTIVE).exists()
