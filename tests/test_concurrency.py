"""The flows that contend for a job's rows run at the same time on PostgreSQL and finish without a deadlock or
a lost update (docs/concurrency.md): cars completing units while the buyer changes the bid and the cap,
while the budget runs out, while the auction ticks, and while the job is cancelled.

Each flow runs in a thread of its own, with its own connection, started together by a barrier; every thread
keeps going for its share of the work, so the transactions really overlap. Afterwards the rows must agree:
every done unit is metered once and counted once, the reservation drew exactly the job's charges rounded up
once, nothing is left leased, and the ledger balances. SQLite has one writer and no row locks, so there is
nothing to contend for there: the services run (CI) runs this."""

import threading
import time

import pytest
from django.db import OperationalError, close_old_connections, connection
from django.db.models import Sum

from billing.models import MeterRecord, Reservation
from billing.money import femto_to_minor_ceil
from billing.reconcile import ledger_differences
from fleet.models import Lease, Vehicle, WorkUnit
from marketplace import flows
from marketplace.core.errors import ApplicationError
from marketplace.models import Job, JobEvent
from tests.factories import VehicleFactory
from tests.test_hot_path_queries import result_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks contend only on PostgreSQL "
                                                                 "(the services run has it)"),
]
CARS = 4


def run_together(*workers, seconds: float = 20.0) -> list[BaseException]:
    """Run each worker (a callable taking a ``stop`` event) in its own thread, started at once; return what
    they raised. The first worker's end stops the rest (after at most ``seconds`` all stop)."""
    barrier, stop, errors = threading.Barrier(len(workers)), threading.Event(), []

    def run(worker):
        try:
            barrier.wait()
            worker(stop)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            errors.append(exc)
        finally:
            stop.set()
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=run, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    stop.set()
    assert not any(thread.is_alive() for thread in threads), "a flow did not finish: a lock was never released"
    return errors


def cars_complete(job: Job, cars: list[Vehicle], refusals: list[str]):
    """A worker: the cars lease and complete the job's units until it closes (or nothing is left)."""

    def work(stop):
        while not stop.is_set():
            progressed = False
            for car in cars:
                units, _ = flows.units_lease(vehicle_id=car.pk, max_units=2)
                for unit in units:
                    try:
                        accepted, reason = flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk,
                                                               epoch=unit.lease_epoch, result=result_for(unit))
                    except ApplicationError as error:  # e.g. the budget ran out: the car is told, nothing booked
                        refusals.append(error.code)
                        continue
                    progressed = progressed or accepted
                    if not accepted:
                        refusals.append(reason)
            job.refresh_from_db(fields=["state"])
            if job.state not in Job.OPEN_STATES:
                return
            if not progressed:
                flows.auction_tick()  # sell the cars' next interval
    return work


def assert_consistent(job: Job) -> None:
    job.refresh_from_db()
    done = WorkUnit.objects.filter(job=job, state=WorkUnit.State.DONE).count()
    meters = MeterRecord.objects.filter(job=job)
    assert job.units_done == done == meters.count(), "a completion was lost or counted twice"
    reservation = Reservation.objects.get(job=job)
    charged = meters.aggregate(c=Sum("charge_femto"))["c"] or 0
    assert reservation.charged_femto == charged, "a draw was lost"
    assert reservation.drawn_minor == femto_to_minor_ceil(femto=charged, currency=job.currency)
    assert reservation.drawn_minor + reservation.released_minor <= reservation.amount_minor
    if job.state not in Job.OPEN_STATES:
        assert reservation.status == Reservation.Status.RELEASED
        assert not WorkUnit.objects.filter(job=job, state__in=[WorkUnit.State.LEASED, WorkUnit.State.QUEUED]).exists()
    assert not Lease.objects.filter(unit__job=job, outcome=Lease.Outcome.ACTIVE).exclude(
        unit__state=WorkUnit.State.LEASED).exists(), "a lease is open on a unit that is not leased"
    assert ledger_differences() == []


def no_deadlock(errors: list[BaseException]) -> None:
    deadlocks = [e for e in errors if isinstance(e, OperationalError)]
    assert not deadlocks, deadlocks
    assert not errors, errors


@pytest.fixture
def market(make_job):
    job = make_job(docs=8 * 60, price=3_000_000)
    cars = [VehicleFactory(policy__reserve_price_micros=1_000_000) for _ in range(CARS)]
    flows.auction_tick()
    return job, cars


def test_units_complete_while_the_bid_and_cap_change_without_deadlock_or_lost_update(market):
    job, cars = market
    refusals: list[str] = []

    def buyer(stop):
        bids = [3_500_000, 2_500_000, 4_000_000, 3_000_000]
        caps = [None, 200, None, 300]
        for i in range(60):
            if stop.is_set():
                return
            try:
                flows.job_terms_update(job=Job.objects.get(pk=job.pk), max_price_micros=bids[i % 4],
                                       budget_cap_minor=caps[i % 4])
            except ApplicationError as error:
                if error.code == "job_closed":  # the last unit completed it meanwhile
                    return
                assert error.code == "insufficient_balance"  # a raise the balance does not cover: refused whole
            time.sleep(0.01)

    no_deadlock(run_together(cars_complete(job, cars[:2], refusals), cars_complete(job, cars[2:], refusals), buyer))
    assert JobEvent.objects.filter(job=job, kind=JobEvent.Kind.BID_CHANGED).exists()
    assert_consistent(job)
    assert job.units_done > 0


def test_units_complete_while_the_job_is_cancelled_without_deadlock_or_lost_update(market):
    job, cars = market
    refusals: list[str] = []

    def buyer(stop):
        while not stop.is_set() and Job.objects.get(pk=job.pk).units_done < 5:
            time.sleep(0.005)
        flows.job_cancel(job=Job.objects.get(pk=job.pk))

    no_deadlock(run_together(cars_complete(job, cars[:2], refusals), cars_complete(job, cars[2:], refusals), buyer))
    assert_consistent(job)
    assert job.state == Job.State.CANCELLED and 5 <= job.units_done < job.units_total


def test_units_complete_while_the_budget_runs_out_and_the_auction_ticks_without_deadlock_or_lost_update(market):
    job, cars = market
    flows.job_budget_update(job=job, budget_cap_minor=3)  # a few cents: it runs out long before the work
    refusals: list[str] = []

    def auctioneer(stop):
        for _ in range(40):
            if stop.is_set():
                return
            flows.auction_tick()
            time.sleep(0.01)

    def buyer(stop):
        for cap in [4, 3, 5, 4, 6, 5] * 5:
            if stop.is_set():
                return
            flows.job_budget_update(job=Job.objects.get(pk=job.pk), budget_cap_minor=cap)
            time.sleep(0.02)

    no_deadlock(run_together(cars_complete(job, cars[:2], refusals), cars_complete(job, cars[2:], refusals),
                             auctioneer, buyer, seconds=30))
    assert_consistent(job)
    reservation = Reservation.objects.get(job=job)
    assert reservation.drawn_minor <= 6 and job.units_done < job.units_total  # the cap held
