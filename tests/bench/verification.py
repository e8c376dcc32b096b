"""Benchmark: verification of results (docs/verification.md) on a simulated fleet, through the real server-side
flows in process: 200 cars of which 5 % cheat, one job of 10,000 units. Ends with one JSON line.

Run alone: python -m tests.bench.verification [--units 10000] [--cars 200] [--max-seconds 480] [--off-seconds 300]
(about 8 minutes on this shared 2-core machine).

What runs. A fresh SQLite database in a temporary directory (embedded profile: Celery tasks run in process,
CELERY_TASK_ALWAYS_EAGER), migrated once and copied back before each of the two runs, removed at the end. A
buyer creates one job through marketplace.flows.job_create (its canaries are picked and their answers computed
there, by the eager task). Then rounds: the gateways' batches (every unsuspended car heartbeats and asks for
work: last_seen_at, work_requested_at), flows.units_verify_sweep (the periodic task), flows.auction_tick, a
fallback flows.unit_arbitrate for any unit left waiting for the platform (the eager task ran them already), then
each car in a shuffled order asks flows.units_lease(vehicle_id=..., max_units=what its speed leaves), answers
each unit with flows.unit_complete, and asks again until it has taken its speed's worth of units this round or
gets none (the auction's allocation and the capacity others leave unused decide), as
tests/fleet/test_verification.py drives the flows. Rounds follow each other at once
(CAPACITY_RECLAIM_AFTER_S = 0, as that test's fixture). The run ends when the job is complete and nothing waits
for a replica or the platform, or at its time bound.

The fleet. ``--cars`` cars (200): 5 % cheaters (10), each its owner's only car; the honest cars belong to
owners with 3, 2 or 1 cars (27 x 3, 19 x 2, 71 x 1 for 190 honest cars: 127 owners in all); 60 % HW4, 40 %
HW3. A car's speed is how many units it takes per round: honest cars and the eight cheaters that cheat from the
start take 1, 2, 3, 4 or 6 by turn (units spread over the fleet as over cars parked for more or less of the
day). The two turncoats (cheat_after=100: honest for their first 100 results, i.e. past the 75 results that
make a car trusted, then cheating) take 16 per round, so that, with about 50 units per car on average, they
live long enough in the run to reach trust and then cheat (a car that builds trust is one that works a lot).

Steady state. A fleet in service is mostly cars with a record. 75 % of the honest cars start with an honest
record from before the run (results_streak drawn in 75..1,000, i.e. replicated at the floor), 25 % are new
(probation). Every cheater starts new (a cheater registers a new car; the turncoats build their record in the
run). Without such a record, 10,000 units over 200 cars (50 each) would keep most cars in probation for the
whole run and no steady state would be seen.

Cheats are the agent's own: fleet.agent.client.Faults (one draw per result, Faults.draw_cheat), cheat_applies,
cheat_embed; tests/bench/verification_support.Car mirrors Agent._cheat_for (cheat_after, replay's fallback to
random vectors). Ten cheaters: random_vectors 100 %, one_vector 50 %, rotate_rows 50 %, negate 100 %, replay
30 %, first_words 20 %, random_vectors 20 %, all six at 10 % each, and the turncoats negate 50 % and
first_words 50 % after 100 honest results. Units hold 2 documents (DOCS_PER_UNIT=2, set before Django starts):
with one text, one_vector and rotate_rows are the honest result (cheat_applies says so) and could not be tested.
The texts are the corpus's short paragraphs (marketplace.corpus, up to 160 characters), cycled.

Honest results are real: every distinct text's int8 embedding (and its first words', for first_words) is computed
once with the reference runtime (fleet.agent.models.get_runner("all-minilm-l6-v2", "int8")), each text alone;
an honest car answers with those rows. The platform's references (canaries, arbitrations, corrections) are
computed by the product itself with the real runtime, unchanged (fleet.services.unit_reference_compute).

Measured, with verification as deployed (VERIFY_PROBATION 3, VERIFY_REPLICATION_FLOOR 0.04, CANARY_SHARE 0.01):

* ``wrong_rows_delivered``: every row of marketplace.selectors.job_results_lines (what the buyer downloads)
  against the true embedding of its document, by cosine; rows under MIN_COSINE["int8"] (0.99), after the run
  (corrections of a closed job included). ``missing_rows``: rows without a result.
* ``cheaters_caught_share``: cheaters caught (Vehicle.wrong_results > 0) over cheaters that sent at least one
  wrong result (a result under the tolerance against the truth); ``cheaters_suspended_share`` likewise.
* ``units_to_catch_p95``: per cheater that cheated, the results it completed from its first wrong one up to
  the one after which it was caught (inclusive), 95th percentile (nearest rank); a cheater never caught counts
  as infinitely many (then null). ``wrong_results_to_catch_p95``: its wrong results by then. The moment of a
  catch is observed by wrapping fleet.services.vehicle_wrong_record (called first by flows.vehicle_caught) in a
  counter that calls it unchanged; the platform's reference computations are counted the same way
  (fleet.services.unit_reference_compute). Nothing else of the product is touched.
* ``honest_suspended``, ``honest_caught``: honest cars suspended, or found wrong at all.
* ``refused_results_cheaters`` / ``_honest``: results refused as stale; a car suspended in the middle of its
  batch has its other leases withdrawn (reason ``suspended``), and the rest of its batch is refused.
* ``verification_overhead``: steady state: over the rounds after half of the job's units were done, (results
  cars computed as replicas + references the platform computed) / units sold in those rounds, plus the job's
  canary references / its units (canaries are all computed when the job is created). Units sold: units whose
  buyer result stands (Job.units_done). ``verification_overhead_whole_run``: the same over the whole run
  (replicas + all references) / units sold. BOINC's fixed two-fold replication costs 1.0. A result the
  platform rejects and has computed again is not counted as overhead (``recomputed_results``: the cost of
  cheating, not of checking).
* ``throughput_ratio``: units sold per CPU second this process spends in the platform's flows (auction ticks,
  leases, results, sweeps, arbitrations with their reference computations, onnxruntime's threads included;
  the simulated cars' own work and the benchmark's bookkeeping are not timed) with verification against
  without. CPU time, not wall time: on this shared machine other processes' load moved the wall-clock ratio
  by more than verification does (a trial run gave 1.08 by wall clock); ``throughput_ratio_wall_clock`` is the
  same by wall clock. Both runs have the same fleet and job, in the same process, each from the same freshly
  migrated database: the run without verification (VERIFY_PROBATION 0,
  VERIFY_REPLICATION_FLOOR 0, CANARY_SHARE 0, as tests/conftest.py turns it off) runs the whole job too
  unless it reaches ``--off-seconds`` (default 300, above what it takes here); when it stops early, the verified
  run's rate is taken over the same first units sold (its first round that reached as many), not over its
  whole run, since rates differ along a run (``throughput_units_compared`` says over how many units).
  ``throughput_ratio_fleet_time``: units sold per round, same stretch: what replicas cost the fleet's
  capacity. ``units_per_s_verified_whole_run`` and ``_steady`` are the verified run's rates over the whole run
  and the steady rounds. Without verification the cheaters' wrong rows go through:
  ``wrong_rows_delivered_unverified`` of ``rows_delivered_unverified``.

The machine is shared: wall-clock rates, and so ``throughput_ratio_wall_clock``, move with the load of other
processes; CPU time moves less (caches and memory bandwidth are shared too).
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.support import ROOT
from tests.bench.verification_support import PRECISION, RUNTIME, Car, Truth, percentile

CHEATER_SHARE = 0.05


def _setup_django(tmp: str, docs_per_unit: int) -> None:
    os.environ["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
    os.environ["VAR_DIR"] = tmp
    os.environ["DOCS_PER_UNIT"] = str(docs_per_unit)
    os.environ.pop("REDIS_URL", None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "marketplace.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    assert settings.CELERY_TASK_ALWAYS_EAGER and settings.DOCS_PER_UNIT == docs_per_unit
    call_command("migrate", verbosity=0)


def _db_reset(tmp: str, pristine: str) -> None:
    """Every mode starts from the same freshly migrated database file."""
    from django.db import connections

    connections.close_all()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}/bench.sqlite3{suffix}").unlink(missing_ok=True)
    shutil.copyfile(pristine, f"{tmp}/bench.sqlite3")


def _texts(count: int) -> list[str]:
    from marketplace import corpus

    short = [text for text in corpus.paragraphs(max_chars=160)]
    return [short[i % len(short)] for i in range(count)]


# --- the fleet ----------------------------------------------------------------------------------------------

def _cheats() -> list[tuple[str, dict]]:
    """The cheaters' agents (fleet.agent.client.Faults): every cheat kind, on a share of their units from 20 % to
    100 %, and cars that build trust first (cheat_after)."""
    return [
        ("random_vectors 100%", {"random_vectors": 1.0}),
        ("one_vector 50%", {"one_vector": 0.5}),
        ("rotate_rows 50%", {"rotate_rows": 0.5}),
        ("negate 100%", {"negate": 1.0}),
        ("replay 30%", {"replay": 0.3}),
        ("first_words 20%", {"first_words": 0.2}),
        ("random_vectors 20%", {"random_vectors": 0.2}),
        ("mix of all six, 60%", {kind: 0.1 for kind in ("random_vectors", "one_vector", "rotate_rows", "negate",
                                                          "replay", "first_words")}),
        ("negate 50% after 100 honest", {"negate": 0.5, "cheat_after": 100}),
        ("first_words 50% after 100 honest", {"first_words": 0.5, "cheat_after": 100}),
    ]


def _owner_sizes(honest: int) -> list[int]:
    """How many honest cars each honest owner has: a few owners with several cars, most with one."""
    sizes, left = [], honest
    for size, owners in ((3, honest // 7), (2, honest // 10)):
        take = min(owners, left // size)
        sizes += [size] * take
        left -= size * take
    return sizes + [1] * left


def _fleet(cars: int, speeds: tuple[int, ...], turncoat_speed: int, established: float, seed: int) -> list[Car]:
    """Create the owners and cars (users directly, cars with tests.factories.VehicleFactory as the tests do). Each
    cheater is its owner's only car and is new; a share ``established`` of the honest cars have an honest record
    from before (see the module's docstring)."""
    from fleet.agent.client import Faults
    from fleet.models import HardwareGeneration, Vehicle
    from marketplace.models import User
    from tests.factories import VehicleFactory

    rng = random.Random(seed)
    hardware = {code: HardwareGeneration.objects.get(code=code) for code in ("HW3", "HW4")}
    cheats = _cheats()
    cheaters = max(1, round(cars * CHEATER_SHARE))
    plan: list[tuple[str, Faults | None, int]] = []  # (label, faults, owner index)
    for i in range(cheaters):
        label, spec = cheats[i % len(cheats)]
        plan.append((label, Faults(**spec, seed=seed * 1000 + i), i))
    owner = cheaters
    for size in _owner_sizes(cars - cheaters):
        plan += [("honest", None, owner)] * size
        owner += 1
    owners = [User.objects.create_user(email=f"bench-owner-{i}@example.com", password=None, role=User.Role.OWNER)
              for i in range(owner)]
    fleet = []
    for i, (label, faults, owner_index) in enumerate(plan):
        code = "HW4" if rng.random() < 0.6 else "HW3"
        speed = turncoat_speed if faults is not None and faults.cheat_after else speeds[i % len(speeds)]
        vehicle = VehicleFactory(owner=owners[owner_index], hardware=hardware[code], policy__reserve_price_micros=0,
                                 throughput_mops={"int8": 50_000 if code == "HW4" else 25_000,
                                                  "fp32": 5_000 if code == "HW4" else 2_500})
        if faults is None and rng.random() < established:
            record = rng.randint(75, 1000)  # trusted: replicated at the floor
            Vehicle.objects.filter(pk=vehicle.pk).update(results_streak=record, checks_passed=max(4, record // 15))
        fleet.append(Car(pk=vehicle.pk, owner_id=owners[owner_index].pk, label=label, speed=speed, faults=faults,
                         seed=seed * 1000 + i))
    return fleet


def _job(texts: list[str]):
    from billing.services import balance_grant
    from marketplace import flows
    from marketplace.models import Organisation, User
    from tests.factories import future

    organisation = Organisation.objects.create(name="Bench buyer", slug="bench-buyer")
    buyer = User.objects.create_user(email="bench-buyer@example.com", password=None, role=User.Role.BUYER,
                                     organisation=organisation)
    balance_grant(organisation=buyer.organisation, amount_minor=10**10, note="bench credit")
    rows = [{"id": f"doc-{i:06d}", "text": text} for i, text in enumerate(texts)]
    return flows.job_create(organisation=buyer.organisation, user=buyer, model_slug=RUNTIME, precision=PRECISION,
                            max_price_micros=2_000_000, deadline=future(hours=6),
                            inputs=[json.dumps(row).encode() + b"\n" for row in rows]), rows


# --- one run ------------------------------------------------------------------------------------------------

class Meter:
    """Counts, by observing two product functions (each wrapped to count, then called unchanged): the platform's
    reference computations (fleet.services.unit_reference_compute: canaries, arbitrations, corrections) and
    the cars caught (fleet.services.vehicle_wrong_record, which flows.vehicle_caught calls first)."""

    def __init__(self, cars: dict[int, Car]):
        from fleet import services

        self.cars, self.references, self.reference_s, self.round = cars, [], 0.0, 0
        self._services = services
        self._compute, self._wrong = services.unit_reference_compute, services.vehicle_wrong_record

        def compute(**kwargs):
            started = time.perf_counter()
            try:
                return self._compute(**kwargs)
            finally:
                self.reference_s += time.perf_counter() - started
                self.references.append(self.round)

        def wrong(*, vehicle_id, now):
            car = self.cars.get(vehicle_id)
            if car is not None and car.caught_at is None:
                car.caught_at, car.wrong_before_caught = car.sent, car.wrong_sent
            return self._wrong(vehicle_id=vehicle_id, now=now)

        services.unit_reference_compute, services.vehicle_wrong_record = compute, wrong

    def close(self) -> None:
        self._services.unit_reference_compute, self._services.vehicle_wrong_record = self._compute, self._wrong


def run(*, verify: bool, units: int, cars: int, speeds: tuple[int, ...], turncoat_speed: int, established: float,
        seed: int, truth: Truth, max_seconds: float, stop_at: int | None, log) -> dict:
    from django.conf import settings
    from django.utils import timezone

    from fleet.models import Lease, Vehicle, WorkUnit
    from marketplace import flows
    from marketplace.models import Job

    if verify:  # as deployed (marketplace.settings' defaults, tests/conftest.py's ``verifying``)
        settings.VERIFY_PROBATION, settings.VERIFY_REPLICATION_FLOOR, settings.CANARY_SHARE = 3, 0.04, 0.01
    else:  # off, as tests/conftest.py turns it off
        settings.VERIFY_PROBATION, settings.VERIFY_REPLICATION_FLOOR, settings.CANARY_SHARE = 0, 0.0, 0.0
    settings.CAPACITY_RECLAIM_AFTER_S = 0  # rounds follow each other at once (tests.fleet.test_verification)

    fleet = _fleet(cars, speeds, turncoat_speed, established, seed)
    by_pk = {car.pk: car for car in fleet}
    meter = Meter(by_pk)
    texts = _texts(units * settings.DOCS_PER_UNIT)
    server = wall = 0.0  # CPU seconds of this process in the flows (the throughput's clock), and wall seconds
    started = time.perf_counter()
    job, rows = _job(texts)
    create_s = time.perf_counter() - started
    canary_references = len(meter.references)
    rng = random.Random(seed)
    replicas = primaries = 0
    refused: list[tuple[str, str]] = []  # (car, reason) of results refused (a lease withdrawn in its batch)
    history = []  # per round: (units done, replica results, reference computations, server seconds)
    rounds, complete, last_print = 0, False, time.perf_counter()
    loop_started = time.perf_counter()
    try:
        while time.perf_counter() - loop_started < max_seconds:
            rounds += 1
            meter.round = rounds
            now = timezone.now()
            # The gateways' batches: every car that is still working heartbeats and asks for work.
            Vehicle.objects.filter(suspended_at=None).update(last_seen_at=now, work_requested_at=now)
            t, w = time.process_time(), time.perf_counter()
            flows.units_verify_sweep()
            flows.auction_tick()
            for unit_id in WorkUnit.objects.filter(verify=WorkUnit.Verify.ARBITER).values_list("pk", flat=True):
                flows.unit_arbitrate(unit_id=unit_id)  # a lost task's (the eager task ran it already)
            server, wall = server + time.process_time() - t, wall + time.perf_counter() - w
            order = list(fleet)
            rng.shuffle(order)
            for car in order:
                got = 0
                while got < car.speed:  # a car that finished its units asks again, up to its speed per round
                    t, w = time.process_time(), time.perf_counter()
                    leased, _ = flows.units_lease(vehicle_id=car.pk, max_units=car.speed - got)
                    server, wall = server + time.process_time() - t, wall + time.perf_counter() - w
                    if not leased:
                        break
                    got += len(leased)
                    kinds = dict(WorkUnit.objects.filter(pk__in=[u.pk for u in leased]).values_list("pk", "verify"))
                    for unit in leased:
                        replica = kinds.get(unit.pk) == WorkUnit.Verify.REPLICA
                        replicas += replica
                        primaries += not replica
                        result, _, _ = car.compute(unit.pk, [doc["text"] for doc in unit.inputs], truth)
                        t, w = time.process_time(), time.perf_counter()
                        accepted, reason = flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk,
                                                               epoch=unit.lease_epoch, result=result)
                        server, wall = server + time.process_time() - t, wall + time.perf_counter() - w
                        if not accepted:  # a well-formed result is accepted whatever its judgement, unless
                            refused.append((car.label, reason))  # its lease was withdrawn meanwhile
            job.refresh_from_db()
            history.append((job.units_done, replicas, len(meter.references), server, wall))
            if time.perf_counter() - last_print > 15:
                last_print = time.perf_counter()
                log(f"  round {rounds}: {job.units_done}/{job.units_total} units done, {replicas} replicas, "
                    f"{len(meter.references)} references, {server:.0f} CPU s ({wall:.0f} s) in the flows")
            open_units = WorkUnit.objects.filter(job=job, state__in=[WorkUnit.State.QUEUED, WorkUnit.State.LEASED])
            waiting = open_units.exists() or WorkUnit.objects.filter(verify=WorkUnit.Verify.ARBITER).exists()
            if job.state == Job.State.COMPLETED and not waiting:
                complete = True
                break
            if stop_at is not None and job.units_done >= stop_at:
                break
    finally:
        meter.close()
    loop_s = time.perf_counter() - loop_started

    # --- what the buyer downloads, row by row against the truth -----------------------------------------
    from fleet.verification import MIN_COSINE
    from marketplace import selectors

    import numpy as np

    text_of = {row["id"]: row["text"] for row in rows}
    delivered = wrong_rows = missing = 0
    for line in selectors.job_results_lines(job=job):
        row = json.loads(line)
        delivered += 1
        if "embedding" not in row:
            missing += 1
            continue
        got = np.asarray(row["embedding"], dtype=np.float64)
        true = truth.row(text_of[row["id"]]).astype(np.float64)
        wrong_rows += float(got @ true / max(np.linalg.norm(got) * np.linalg.norm(true), 1e-12)) < MIN_COSINE[PRECISION]

    standing = {v.pk: v for v in Vehicle.objects.filter(pk__in=by_pk)}
    cheaters = [car for car in fleet if car.cheater]
    honest = [car for car in fleet if not car.cheater]
    cheated = [car for car in cheaters if car.wrong_sent]
    caught = [car for car in cheated if standing[car.pk].wrong_results > 0]
    suspended = [car for car in cheated if standing[car.pk].suspended_at is not None]
    # Units a cheater completes before it is caught: its results from its first wrong one up to the one after
    # which it was caught (inclusive). A cheater never caught counts as infinitely many.
    to_catch = [car.caught_at - car.first_wrong_at + 1 if car.caught_at is not None else float("inf")
                for car in cheated]
    wrong_to_catch = [car.wrong_before_caught if car.caught_at is not None else float("inf") for car in cheated]
    p95 = percentile(to_catch, 0.95)
    wp95 = percentile(wrong_to_catch, 0.95)

    sold = job.units_done
    arbitrations = len(meter.references) - canary_references
    overhead_whole = (replicas + len(meter.references)) / max(1, sold)
    # Steady state: the rounds after half of the job's units were done.
    half = next((i for i, h in enumerate(history) if h[0] >= job.units_total / 2), None)
    steady = None
    if half is not None and complete:
        d_done = history[-1][0] - history[half][0]
        d_replicas = history[-1][1] - history[half][1]
        d_refs = history[-1][2] - history[half][2]
        if d_done > 0:
            steady = {"units_sold": d_done, "replica_results": d_replicas, "platform_references": d_refs,
                      "overhead": (d_replicas + d_refs) / d_done + canary_references / job.units_total,
                      "rounds": len(history) - 1 - half,
                      "units_per_server_s": d_done / max(1e-9, history[-1][3] - history[half][3])}
    from billing.models import LedgerEntry
    from django.db.models import Sum

    ledger = LedgerEntry.objects.aggregate(total=Sum("amount_minor"))["total"] or 0
    return {
        "history": history,
        "verify": verify, "complete": complete, "rounds": rounds, "units_total": job.units_total, "units_sold": sold,
        "create_s": round(create_s, 2), "loop_s": round(loop_s, 2), "server_s": round(server, 2),
        "server_wall_s": round(wall, 2),
        "reference_s": round(meter.reference_s, 2),
        "units_per_server_s": sold / max(1e-9, server), "units_per_server_wall_s": sold / max(1e-9, wall),
        "units_per_round": sold / max(1, rounds),
        "car_results": replicas + primaries, "replica_results": replicas,
        "recomputed_results": primaries - sold, "canary_references": canary_references,
        "arbitration_references": arbitrations,
        "verification_overhead_whole_run": overhead_whole, "steady": steady,
        "delivered_rows": delivered, "wrong_rows_delivered": wrong_rows, "missing_rows": missing,
        "voided_results": Lease.objects.filter(verdict=Lease.Verdict.VOIDED).count(),
        "cheaters": len(cheaters), "cheaters_that_cheated": len(cheated), "cheaters_caught": len(caught),
        "cheaters_suspended": len(suspended),
        "units_to_catch": [None if x == float("inf") else x for x in to_catch],
        "units_to_catch_p95": None if p95 == float("inf") else p95,
        "wrong_results_to_catch_p95": None if wp95 == float("inf") else wp95,
        "honest_suspended": sum(standing[car.pk].suspended_at is not None for car in honest),
        "honest_caught": sum(standing[car.pk].wrong_results > 0 for car in honest),
        "ledger_sum_minor": ledger,
        "per_cheater": [{"label": car.label, "results": car.sent, "wrong": car.wrong_sent,
                         "first_wrong_at": car.first_wrong_at, "caught_at": car.caught_at,
                         "wrong_before_caught": car.wrong_before_caught,
                         "suspended": standing[car.pk].suspended_at is not None} for car in cheaters],
        "honest_results": sorted(car.sent for car in honest),
        "refused_honest": sorted({reason for label, reason in refused if label == "honest"}),
        "refused_results_honest": sum(label == "honest" for label, _ in refused),
        "refused_results_cheaters": sum(label != "honest" for label, _ in refused),
    }


def _rate_at(history: list[tuple], units: int) -> tuple[int, float, float] | None:
    """(units done, flow CPU seconds, flow wall seconds) at the end of the first round by which ``units`` units
    were done."""
    for done, _, _, server, wall in history:
        if done >= units:
            return done, server, wall
    return None


def main(*, units: int, cars: int, docs_per_unit: int, speeds: tuple[int, ...], turncoat_speed: int,
         established: float, seed: int, max_seconds: float, off_seconds: float) -> dict:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_verification_")
    try:
        _setup_django(tmp, docs_per_unit)
        from django.db import connections

        connections.close_all()
        pristine = f"{tmp}/pristine.sqlite3"
        shutil.copyfile(f"{tmp}/bench.sqlite3", pristine)
        truth = Truth()
        texts = _texts(units * docs_per_unit)
        from fleet.agent.client import first_words

        truth.warm(sorted({t for text in set(texts) for t in (text, first_words(text))}))
        log(f"{truth.computed} true embeddings computed in {time.perf_counter() - started:.0f} s")
        common = dict(units=units, cars=cars, speeds=speeds, turncoat_speed=turncoat_speed, established=established,
                      seed=seed, truth=truth, stop_at=None, log=log)
        _db_reset(tmp, pristine)
        log("verification off (the same fleet and job):")
        off = run(verify=False, max_seconds=off_seconds, **common)
        _db_reset(tmp, pristine)
        log("verification on:")
        on = run(verify=True, max_seconds=max_seconds, **common)
    finally:
        from django.db import connections

        connections.close_all()
        shutil.rmtree(tmp, ignore_errors=True)

    # Throughput over the same stretch of the same workload: the units the unverified run sold in its time.
    prefix = off["units_sold"]
    on_at = _rate_at(on["history"], prefix) or (on["units_sold"], on["server_s"], on["server_wall_s"])
    off_rate = off["units_sold"] / max(1e-9, off["server_s"])
    on_rate = on_at[0] / max(1e-9, on_at[1])
    off_wall_rate = off["units_sold"] / max(1e-9, off["server_wall_s"])
    on_wall_rate = on_at[0] / max(1e-9, on_at[2])
    off_rounds = len(off["history"])
    on_rounds_at = next((i + 1 for i, h in enumerate(on["history"]) if h[0] >= prefix), len(on["history"]))
    on_fleet = on_at[0] / on_rounds_at
    off_fleet = off["units_sold"] / max(1, off_rounds)
    cheated = on["cheaters_that_cheated"]
    steady = on["steady"] or {}
    figures = {
        "bench": "verification", "profile": "sqlite, flows in process",
        "cars": cars, "cheaters": on["cheaters"], "units": on["units_total"], "docs_per_unit": docs_per_unit,
        "complete": on["complete"],
        "cheaters_caught_share": None if not cheated else round(on["cheaters_caught"] / cheated, 4),
        "cheaters_suspended_share": None if not cheated else round(on["cheaters_suspended"] / cheated, 4),
        "cheaters_that_cheated": cheated,
        "units_to_catch_p95": on["units_to_catch_p95"],
        "wrong_results_to_catch_p95": on["wrong_results_to_catch_p95"],
        "units_to_catch": on["units_to_catch"],
        "wrong_rows_delivered": on["wrong_rows_delivered"],
        "missing_rows": on["missing_rows"],
        "honest_suspended": on["honest_suspended"],
        "honest_caught": on["honest_caught"],
        "verification_overhead": None if not steady else round(steady["overhead"], 4),
        "verification_overhead_whole_run": round(on["verification_overhead_whole_run"], 4),
        "replica_results": on["replica_results"], "canary_references": on["canary_references"],
        "arbitration_references": on["arbitration_references"], "recomputed_results": on["recomputed_results"],
        "voided_results": on["voided_results"],
        "refused_results_cheaters": on["refused_results_cheaters"],
        "refused_results_honest": on["refused_results_honest"],
        "throughput_ratio": round(on_rate / max(1e-9, off_rate), 3),
        "throughput_ratio_fleet_time": round(on_fleet / max(1e-9, off_fleet), 3),
        "throughput_ratio_wall_clock": round(on_wall_rate / max(1e-9, off_wall_rate), 3),
        "throughput_units_compared": on_at[0],
        "units_per_s_verified": round(on_rate, 1), "units_per_s_unverified": round(off_rate, 1),
        "units_per_s_verified_whole_run": round(on["units_per_server_s"], 1),
        "units_per_wall_s_verified": round(on_wall_rate, 1), "units_per_wall_s_unverified": round(off_wall_rate, 1),
        "units_per_s_verified_steady": None if not steady else round(steady["units_per_server_s"], 1),
        "wrong_rows_delivered_unverified": off["wrong_rows_delivered"],
        "rows_delivered_unverified": off["delivered_rows"] - off["missing_rows"],
        "rounds": on["rounds"], "reference_s": on["reference_s"],
        "ledger_balanced": on["ledger_sum_minor"] == 0 and off["ledger_sum_minor"] == 0,
        "per_cheater": on["per_cheater"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--cars", type=int, default=200)
    parser.add_argument("--docs-per-unit", type=int, default=2)
    parser.add_argument("--speeds", default="1,2,3,4,6", help="units each honest car takes per round, by turn")
    parser.add_argument("--turncoat-speed", type=int, default=16)
    parser.add_argument("--established", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=480.0, help="bound of the verified run's loop")
    parser.add_argument("--off-seconds", type=float, default=300.0, help="bound of the unverified run's loop")
    args = parser.parse_args()
    result = main(units=args.units, cars=args.cars, docs_per_unit=args.docs_per_unit,
                  speeds=tuple(int(s) for s in args.speeds.split(",")), turncoat_speed=args.turncoat_speed,
                  established=args.established, seed=args.seed, max_seconds=args.max_seconds,
                  off_seconds=args.off_seconds)
    for cheater in result["per_cheater"]:
        print(f"cheater {cheater['label']}: {cheater['results']} results, {cheater['wrong']} wrong, first wrong at "
              f"{cheater['first_wrong_at']}, caught at {cheater['caught_at']}, suspended {cheater['suspended']}")
    print(json.dumps(result))
