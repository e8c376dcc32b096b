"""Cheaters, end to end (docs/verification.md): real agents over the real gateway, with every part of the
product running in its own processes (tests/support/live.py: in the services profile two gateway processes,
a Celery worker that computes canaries' answers and arbitrates, and Celery beat), and cars of the fleet
simulator (fleet.agent.sim.run_fleet) of which some run with a cheating mode of ``--faults``
(fleet.agent.client.Faults) beside honest ones.

* Every kind of result cheat, one car each, beside honest cars of other owners: no wrong row reaches the
  buyer (the results are downloaded as a buyer does and compared with the reference runtime), every cheater
  is caught and suspended and keeps no pay, no honest car is ever found wrong, every unit is paid once and
  the ledger balances.
* A car that builds trust and then cheats: caught, its results accepted unchecked are voided and clawed back.
* A black hole (declares a huge capacity, never asks for work) and two hoarders (take leases, heartbeat them,
  never send a result) beside two honest cars: the job completes within a bound.

The cars' routines are real (fleet.agent.sim.SimulatedSensors) at time scale 1, and each car's seed is
chosen so that it is parked on WiFi for the whole test: what is tested is the cars' honesty, not their
commute (tests/e2e/test_chaos.py does that)."""

import asyncio
import json
import random
import threading
import time
import urllib.request
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from django.db.models import Count, Sum
from django.utils import timezone

from billing.models import Clawback, LedgerEntry, MeterRecord
from billing.selectors import unbalanced_transaction_ids
from fleet import services as fleet
from fleet import verification
from fleet.workloads.embedding import MIN_COSINE
from fleet.agent.client import Faults, first_words
from fleet.agent.models import get_runner
from fleet.agent.sim import SimulatedSensors, run_fleet
from fleet.models import HardwareGeneration, Lease, Vehicle, WorkUnit
from marketplace import corpus, flows, services
from marketplace.models import Job
from tests.factories import BuyerFactory, OwnerFactory
from tests.support.live import live_product

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

RUNTIME, PRECISION = "all-minilm-l6-v2", "int8"
# Fast clocks, as in the chaos test: auctions every 0.5 s, a lease lives 3 s without a heartbeat, heartbeats
# every second. A replica no car of another owner takes within 20 s (not 60) goes to the platform, and the
# sweep that sends it runs every 2 s, so that the tail of a small job does not wait a minute.
PRODUCT_ENV = {"AUCTION_INTERVAL_S": "0.5", "LEASE_TTL_S": "3", "HEARTBEAT_INTERVAL_S": "1",
               "LEASE_SWEEP_INTERVAL_S": "0.5", "VEHICLE_STALE_AFTER_S": "4", "REPLICA_WAIT_S": "20",
               "VERIFY_SWEEP_INTERVAL_S": "2"}
# Two documents per unit, so that the cheats that reorder or repeat rows (one_vector, rotate_rows) change a
# result: with one document they send the honest one.
DOCS_PER_UNIT = 2
# Every car is parked on WiFi (no commute, no outage) for at least this long from the test's start.
PARKED_FOR_S = 1800.0


def parked_seeds(count: int, *, start: int, watts: float) -> list[int]:
    """``count`` car seeds, from ``start`` on, whose simulated car (at time scale 1, the scale the tests run)
    stays parked on WiFi, without an outage, above the battery floor, for PARKED_FOR_S: the routine a seed
    draws depends on the seed alone, so it is read here on a fake clock."""
    seeds, seed = [], start
    while len(seeds) < count:
        now = [0.0]
        sensors = SimulatedSensors(random.Random(seed), watts, time_scale=1.0, clock=lambda: now[0])
        ok = True
        for t in range(0, int(PARKED_FOR_S) + 1, 10):
            now[0] = float(t)
            if sensors.driving or not sensors.on_wifi or sensors.battery_pct < 40:
                ok = False
                break
        if ok:
            seeds.append(seed)
        seed += 1
    return seeds


def make_cars(names: list[str], *, seed_start: int) -> list[dict]:
    """One paired car per name, each of an owner of its own (replicas go to cars of another owner)."""
    hardware = HardwareGeneration.objects.get(code="HW4")
    seeds = parked_seeds(len(names), start=seed_start, watts=hardware.watts)
    cars = []
    for name, seed in zip(names, seeds):
        vehicle, code = fleet.vehicle_create(owner=OwnerFactory(), name=name, hardware=hardware)
        _, token = fleet.vehicle_pair(code=code)
        cars.append({"name": name, "token": token, "hardware_watts": hardware.watts, "seed": seed, "id": vehicle.pk})
    return cars


def documents(count: int, offset: int = 0) -> list[dict]:
    """Short corpus documents (at most 160 characters, cut at a word), each longer than the four words the
    first_words cheat embeds, and all distinct."""
    docs, seen = [], set()
    for doc in corpus.documents(4000)[offset:]:
        text = doc["text"][:160].rsplit(" ", 1)[0]
        if first_words(text) != text and text not in seen:
            seen.add(text)
            docs.append({"id": doc["id"], "text": text})
            if len(docs) == count:
                return docs
    raise AssertionError("the corpus has too few documents")


def create_job(buyer, docs: list[dict]) -> Job:
    return flows.job_create(organisation=buyer.organisation, user=buyer, model_slug=RUNTIME, precision=PRECISION,
                            max_price_micros=5_000_000, deadline=timezone.now() + timedelta(hours=1),
                            inputs=[json.dumps(d).encode() + b"\n" for d in docs])


class Fleet:
    """Groups of cars, each run by run_fleet (the fleet simulator's core) with the group's faults (None:
    honest), all in one event loop on a thread of their own; ``agents`` maps each car's name to its agent."""

    def __init__(self, base: str, groups: list[tuple[list[dict], Faults | None]]):
        self.stop = asyncio.Event()
        self.loop = asyncio.new_event_loop()
        self.lists: list[list] = [[] for _ in groups]
        self.failures: list[BaseException] = []

        async def main():
            await asyncio.gather(*(
                run_fleet(base, [{k: v for k, v in car.items() if k != "id"} for car in cars], stop=self.stop,
                          time_scale=1.0, faults=faults, executor_threads=2 if faults is None else 1,
                          telemetry_interval_s=1.0, agents=agents)
                for (cars, faults), agents in zip(groups, self.lists)))

        def run():
            try:
                self.loop.run_until_complete(main())
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)

    @property
    def agents(self) -> dict:
        return {agent.name: agent for agents in self.lists for agent in agents}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(90)
        assert not self.thread.is_alive(), "the fleet did not stop"
        assert not self.failures, self.failures


def run_until_completed(job: Job, fleet_: Fleet, procs, *, limit_s: float) -> float:
    """Wait for the job to complete; its time in seconds. Fails past ``limit_s``."""
    started = time.monotonic()
    while Job.objects.get(pk=job.pk).state != Job.State.COMPLETED:
        elapsed = time.monotonic() - started
        assert elapsed < limit_s, (
            f"not completed after {elapsed:.0f} s: "
            f"{Counter(WorkUnit.objects.filter(job=job).values_list('state', 'verify'))}\n{procs.logs()}")
        assert not fleet_.failures, fleet_.failures
        time.sleep(0.5)
    return time.monotonic() - started


def download(base: str, buyer, job: Job) -> list[dict]:
    """The job's results as its buyer downloads them: GET /api/v1/jobs/<id>/results/ with an API key."""
    _, secret = services.api_key_create(organisation=buyer.organisation, name="download", created_by=buyer)
    request = urllib.request.Request(f"{base}/api/v1/jobs/{job.pk}/results/",
                                     headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [json.loads(line) for line in response.read().decode().splitlines()]


def wrong_rows(rows: list[dict], docs: list[dict]) -> list[str]:
    """The ids of the downloaded rows whose embedding is not the reference runtime's (cosine below
    MIN_COSINE at the job's precision), or that are missing."""
    assert [row["id"] for row in rows] == [doc["id"] for doc in docs]
    truth = get_runner(RUNTIME, PRECISION).embed([doc["text"] for doc in docs])
    wrong = []
    for row, expected in zip(rows, truth):
        if "embedding" not in row:
            wrong.append(row["id"])
            continue
        vector = np.asarray(row["embedding"], dtype=np.float32)
        cosine = float(vector @ expected / (np.linalg.norm(vector) * np.linalg.norm(expected)))
        if cosine < MIN_COSINE[PRECISION]:
            wrong.append(row["id"])
    return wrong


def owner_earned_minor(vehicle_id: int) -> int:
    owner = Vehicle.objects.get(pk=vehicle_id).owner
    return LedgerEntry.objects.filter(account__owner=owner, account__kind="owner").aggregate(
        total=Sum("amount_minor"))["total"] or 0


def assert_paid_once_and_balanced(job: Job) -> None:
    """Every unit done, with exactly one buyer meter record standing (not clawed back), paid to the car whose
    result was delivered, for a lease whose result stands; and the ledger balances."""
    units = WorkUnit.objects.filter(job=job)
    assert units.count() == job.units_total == units.filter(state=WorkUnit.State.DONE).count()
    standing = MeterRecord.objects.filter(job=job, role=MeterRecord.Role.BUYER, clawback=None)
    assert standing.count() == job.units_total
    assert not standing.values("unit").annotate(n=Count("pk")).filter(n__gt=1).exists()
    for record in standing.select_related("unit"):
        assert record.vehicle_id == record.unit.completed_by_id
        lease = Lease.objects.get(unit=record.unit, epoch=record.epoch)
        assert lease.verdict in (Lease.Verdict.UNCHECKED, Lease.Verdict.AGREED, Lease.Verdict.RIGHT), lease.verdict
    # A result found wrong is paid nothing, in either role.
    for unit_id, epoch in Lease.objects.filter(unit__job=job, verdict=Lease.Verdict.WRONG).values_list("unit", "epoch"):
        assert not MeterRecord.objects.filter(unit_id=unit_id, epoch=epoch).exists()
    assert unbalanced_transaction_ids() == []


# --- every kind of cheat beside honest cars --------------------------------------------------------------

HONEST = 8
# One car per result cheat, each cheating on every result it can. The replay car is honest for its first two
# results (it needs an earlier unit's embeddings to replay): a car that starts honestly and then cheats.
CHEATERS = {
    "random_vectors": Faults(random_vectors=1.0, seed=1),
    "one_vector": Faults(one_vector=1.0, seed=2),
    "rotate_rows": Faults(rotate_rows=1.0, seed=3),
    "negate": Faults(negate=1.0, seed=4),
    "replay": Faults(replay=1.0, cheat_after=2, seed=5),
    "first_words": Faults(first_words=1.0, seed=6),
}


def test_cheaters_of_every_kind_are_caught_suspended_and_deliver_nothing(tmp_path, settings, verifying):
    """8 honest cars and 6 cheaters (one per cheat kind), each of its own owner, on a job of 120 units of two
    short documents. Verification runs with the deployed defaults (the test process, which creates the job and
    so draws its canaries, too): a new car's first VERIFY_PROBATION (3) results are all replicated, and after a
    wrong one every result is, so each cheater is caught on its first wrong result and suspended on its second."""
    settings.DOCS_PER_UNIT = DOCS_PER_UNIT
    units = 120
    buyer = BuyerFactory()
    docs = documents(units * DOCS_PER_UNIT)
    job = create_job(buyer, docs)
    assert job.units_total == units
    honest = make_cars([f"Honest car {i}" for i in range(HONEST)], seed_start=1000)
    cheaters = dict(zip(CHEATERS, make_cars([f"Cheater {kind}" for kind in CHEATERS], seed_start=5000)))
    groups = [(honest, None), *(([cheaters[kind]], faults) for kind, faults in CHEATERS.items())]

    with live_product(tmp_path, **PRODUCT_ENV, DOCS_PER_UNIT=str(DOCS_PER_UNIT)) as (base, procs):
        with Fleet(base, groups) as cars:
            elapsed = run_until_completed(job, cars, procs, limit_s=240)
            rows = download(base, buyer, job)
        agents = cars.agents

    # No wrong row was delivered: every downloaded row is the reference runtime's embedding of its document.
    assert wrong_rows(rows, docs) == []
    job.refresh_from_db()
    assert job.units_done == units

    injected = {kind: agents[car["name"]].stats.faults_injected.get(kind, 0) for kind, car in cheaters.items()}
    report = {kind: {"injected": injected[kind], "sent": agents[car["name"]].stats.units_done,
                     **Vehicle.objects.filter(pk=car["id"]).values("wrong_results", "checks_passed",
                                                                    "suspended_at").get()}
              for kind, car in cheaters.items()}
    print("cheaters:", json.dumps({"seconds": round(elapsed, 1), **report}, default=str))
    # Every cheater really cheated, and was caught and suspended: its second wrong result suspends it.
    for kind, car in cheaters.items():
        vehicle = Vehicle.objects.get(pk=car["id"])
        assert injected[kind] >= 1, report
        assert vehicle.wrong_results >= 1, report
        if injected[kind] >= verification.SUSPEND_AFTER_WRONG:
            assert vehicle.suspended_at is not None, report
        # Paid nothing for a wrong result; what it keeps is pay for results a check showed right (the replay
        # car's honest first two), in no case a result accepted unchecked.
        kept = MeterRecord.objects.filter(vehicle_id=car["id"], clawback=None)
        for record in kept:
            assert Lease.objects.get(unit=record.unit, epoch=record.epoch).verdict in (
                Lease.Verdict.AGREED, Lease.Verdict.RIGHT), (kind, record.pk)
        if CHEATERS[kind].cheat_after == 0:  # cheats on every result: earns nothing at all
            assert not kept.exists(), kind
            assert owner_earned_minor(car["id"]) <= 0, kind
        # Caught, so no result of it stands unchecked: any was voided.
        assert not Lease.objects.filter(vehicle_id=car["id"], verdict=Lease.Verdict.UNCHECKED).exists(), kind
    assert Vehicle.objects.filter(pk__in=[c["id"] for c in cheaters.values()], suspended_at__isnull=False).count() >= 5
    # No honest car was ever found wrong, suspended or clawed back, and honest cars did the work.
    for car in honest:
        vehicle = Vehicle.objects.get(pk=car["id"])
        assert vehicle.suspended_at is None and vehicle.wrong_results == 0 and vehicle.wrong_recent == 0, car["name"]
        assert not Lease.objects.filter(vehicle=vehicle,
                                        verdict__in=[Lease.Verdict.WRONG, Lease.Verdict.VOIDED]).exists()
        assert not Clawback.objects.filter(meter__vehicle=vehicle).exists()
    assert sum(Vehicle.objects.get(pk=car["id"]).checks_passed for car in honest) > 0
    assert_paid_once_and_balanced(job)


# --- a car that builds trust, then cheats ------------------------------------------------------------------

# Honest for this many results, then negated vectors on every result.
TURNCOAT_HONEST = 10
# The replication floor the servers run with in this test (default 0.04): each result of a trusted car is
# replicated with probability 0.5 (canaries add 1 %). So some of its honest results are accepted unchecked
# and paid (the test waits for one before the honest cars join), and once it cheats it is caught within
# k wrong results with probability 1 - 0.5^k (more: a replica of another car's result that it takes is
# always compared). It gets about 0.4 units a second, and cheats for more than half of the job.
TURNCOAT_FLOOR = 0.5


def test_a_car_that_builds_trust_then_cheats_is_caught_and_clawed_back(tmp_path, settings, verifying):
    """A trusted car (a long honest record: results_streak 10^6, so only the floor's share of its results is
    checked) beside two honest new cars, on a job of 160 units: honest for its first 10 results, some of which
    are accepted unchecked and paid, then it negates its vectors. It is caught, suspended, and every result
    of it accepted unchecked is voided: clawed back (billing.models.Clawback) and computed again by another car
    while the job is open; it keeps only pay for results a check showed right. No wrong row is delivered."""
    settings.DOCS_PER_UNIT = DOCS_PER_UNIT
    units = 160
    buyer = BuyerFactory()
    docs = documents(units * DOCS_PER_UNIT, offset=400)
    job = create_job(buyer, docs)
    honest = make_cars(["Honest car A", "Honest car B"], seed_start=1000)
    [turncoat] = make_cars(["Turncoat"], seed_start=5000)
    Vehicle.objects.filter(pk=turncoat["id"]).update(results_streak=10**6)  # trusted: checked at the floor's rate
    faults = Faults(negate=1.0, cheat_after=TURNCOAT_HONEST, seed=7)

    env = {**PRODUCT_ENV, "DOCS_PER_UNIT": str(DOCS_PER_UNIT), "VERIFY_REPLICATION_FLOOR": str(TURNCOAT_FLOOR)}
    with live_product(tmp_path, **env) as (base, procs):
        # The turncoat works alone until one of its results is accepted unchecked (each is, with probability
        # 0.5, the platform checking the others: no car of another owner is there), then the honest cars join.
        # Together from the start, it took almost only replicas of the new honest cars' results (the lowest
        # queued units), which are always compared, so it had nothing unchecked to void.
        with Fleet(base, [([turncoat], faults)]) as alone:
            deadline = time.monotonic() + 120
            while not Lease.objects.filter(vehicle_id=turncoat["id"], verdict=Lease.Verdict.UNCHECKED).exists():
                assert time.monotonic() < deadline and not alone.failures, procs.logs()
                time.sleep(0.2)
            with Fleet(base, [(honest, None)]) as cars:
                elapsed = run_until_completed(job, cars, procs, limit_s=240)
                rows = download(base, buyer, job)
        agent = alone.agents["Turncoat"]

    assert wrong_rows(rows, docs) == []
    vehicle = Vehicle.objects.get(pk=turncoat["id"])
    leases = Counter(Lease.objects.filter(vehicle=vehicle).values_list("verdict", flat=True))
    clawbacks = Clawback.objects.filter(meter__vehicle=vehicle)
    report = {"seconds": round(elapsed, 1), "sent": agent.stats.units_done,
              "negated": agent.stats.faults_injected.get("negate", 0), "verdicts": dict(leases),
              "clawbacks": clawbacks.count(), "wrong_results": vehicle.wrong_results,
              "suspended": vehicle.suspended_at is not None,
              "leases_by_car": {name: dict(Counter(f"{o}/{r}/{v}" for name_, o, r, v in Lease.objects.filter(
                  unit__job=job).values_list("vehicle__name", "outcome", "reason", "verdict") if name_ == name))
                  for name in ("Turncoat", "Honest car A", "Honest car B")}}
    print("turncoat:", json.dumps(report))
    assert agent.stats.units_done > TURNCOAT_HONEST and report["negated"] >= 1, report
    # Caught and suspended,
    assert vehicle.wrong_results >= 1 and leases[Lease.Verdict.WRONG] >= 1, report
    if report["negated"] >= verification.SUSPEND_AFTER_WRONG:
        assert vehicle.suspended_at is not None, report
    # its results accepted unchecked voided and clawed back, one clawback per voided result, none left standing,
    assert leases[Lease.Verdict.UNCHECKED] == 0 and leases[Lease.Verdict.VOIDED] >= 1, report
    voided = set(Lease.objects.filter(vehicle=vehicle, verdict=Lease.Verdict.VOIDED).values_list("unit", "epoch"))
    assert set(clawbacks.values_list("meter__unit", "meter__epoch")) == voided, report
    # and what it keeps is pay for results a check showed right (its honest ones), nothing else.
    for record in MeterRecord.objects.filter(vehicle=vehicle, clawback=None):
        assert Lease.objects.get(unit=record.unit, epoch=record.epoch).verdict in (
            Lease.Verdict.AGREED, Lease.Verdict.RIGHT), report
    # The voided units were computed again (the job was open), by another lease that stands.
    for unit_id, epoch in voided:
        standing = MeterRecord.objects.get(unit_id=unit_id, role=MeterRecord.Role.BUYER, clawback=None)
        assert standing.epoch > epoch, report
    for car in honest:
        honest_vehicle = Vehicle.objects.get(pk=car["id"])
        assert honest_vehicle.suspended_at is None and honest_vehicle.wrong_results == 0, car["name"]
        assert not Clawback.objects.filter(meter__vehicle=honest_vehicle).exists()
    assert_paid_once_and_balanced(job)


# --- a black hole and hoarders -----------------------------------------------------------------------------

# Leases live at most this long however a car heartbeats them (LEASE_MAX_LIFETIME_S, 300 s by default, cut
# here so that the bound below is short). The slow hoarder declares the throughput at which a unit takes it
# HOARD_UNIT_S, so that its leases are sized to live 4 x 4 s + the TTL, more than this cap: the longest
# lifetime there is. (A car that declares far less gets nothing: it could finish no unit in its working time.)
HOARD_LIFETIME_S = 15
HOARD_UNIT_S = 4
# The bound: what two honest cars need for the job (about 10 to 25 s here, with their results replicated
# while they are new), plus the hoarders' leases running out, each at most HOARD_LIFETIME_S plus a sweep, a
# few times over (a hoarder takes a unit again when its lease has run out, one at a time after its strikes).
HOARD_BOUND_S = 120


def test_a_black_hole_and_hoarders_do_not_stall_a_job(tmp_path, settings, verifying):
    """A black hole (hello, telemetry and heartbeats, declaring the largest throughput the protocol allows, and
    never a work request) and two hoarders (they ask for work and list their leases in heartbeats, never
    compute nor release them: one at its measured throughput, so it may hold several leases, and one that
    declares itself slow, for the longest lease lifetime) beside two honest cars, on a job of 60 units: the job
    completes within HOARD_BOUND_S. The black hole is offered nothing (only cars that ask are), the hoarders'
    leases all run out and they are paid nothing; every unit is paid once and the ledger balances."""
    settings.DOCS_PER_UNIT = DOCS_PER_UNIT
    units = 60
    buyer = BuyerFactory()
    docs = documents(units * DOCS_PER_UNIT, offset=900)
    job = create_job(buyer, docs)
    honest = make_cars(["Honest car A", "Honest car B"], seed_start=1000)
    black_hole, hoarder, slow_hoarder = make_cars(["Black hole", "Hoarder", "Slow hoarder"], seed_start=5000)
    slow_mops = max(1, job.mops_total // job.units_total // HOARD_UNIT_S)
    groups = [(honest, None), ([black_hole], Faults(black_hole=True, declare_mops=10**12, seed=8)),
              ([hoarder], Faults(hoard=True, seed=9)),
              ([slow_hoarder], Faults(hoard=True, declare_mops=slow_mops, seed=10))]

    env = {**PRODUCT_ENV, "DOCS_PER_UNIT": str(DOCS_PER_UNIT), "LEASE_MAX_LIFETIME_S": str(HOARD_LIFETIME_S)}
    with live_product(tmp_path, **env) as (base, procs):
        with Fleet(base, groups) as cars:
            elapsed = run_until_completed(job, cars, procs, limit_s=HOARD_BOUND_S)
            rows = download(base, buyer, job)
        agents = cars.agents

    hoarded = {name: Lease.objects.filter(vehicle_id=car["id"]) for name, car in
               (("Hoarder", hoarder), ("Slow hoarder", slow_hoarder))}
    report = {"seconds": round(elapsed, 1), "black_hole": agents["Black hole"].stats.faults_injected,
              **{name: {"injected": agents[name].stats.faults_injected,
                        "leases": dict(Counter(f"{o}/{r}" for o, r in leases.values_list("outcome", "reason")))}
                 for name, leases in hoarded.items()}}
    print("black hole and hoarders:", json.dumps(report))
    assert wrong_rows(rows, docs) == []
    # The black hole asked for nothing and got nothing.
    assert agents["Black hole"].stats.faults_injected.get("black_hole", 0) >= 1
    assert not Lease.objects.filter(vehicle_id=black_hole["id"]).exists()
    # The hoarders really hoarded; none of their leases completed, each ran out (or was withdrawn), none is
    # paid; the greedy one's strikes count against it.
    for name, leases in hoarded.items():
        assert agents[name].stats.faults_injected.get("hoard", 0) >= 1 and leases.exists(), report
        assert not leases.filter(outcome=Lease.Outcome.COMPLETED).exists(), report
    assert Vehicle.objects.get(pk=hoarder["id"]).lease_strikes >= 1, report
    assert not MeterRecord.objects.filter(vehicle_id__in=[black_hole["id"], hoarder["id"], slow_hoarder["id"]]).exists()
    assert_paid_once_and_balanced(job)
