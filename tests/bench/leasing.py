"""Benchmark: leases per second through our dispatcher (marketplace.flows.units_lease) on PostgreSQL with 1, 2, 4
and 8 concurrent leaser processes, against a bare psycopg leaser (UPDATE ... WHERE id IN (SELECT ... FOR
UPDATE SKIP LOCKED) RETURNING) on the same table in the same run; counts double leases. Ends with one JSON line.

The fixture: a throwaway database with one job of UNITS units and CARS parked, eligible cars (HW3/HW4 at their
nominal throughput, home uplinks of 10-50 Mbit/s) that each won plenty of capacity in the latest round. Each
leaser process works through its own share of the cars, asking units_lease for each car in turn (as the car's
gateway connection would on work.request); a car at its in-flight limit is passed over. Units are requeued
between configurations.

Run alone: python -m tests.bench.leasing [--seconds 4] [--leasers 1,2,4,8]"""

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time

from tests.bench.support import ROOT, throwaway_postgres

UNITS = 200_000
CARS = 4_000

BARE_SQL = """UPDATE fleet_workunit SET state = 'leased', leased_to_id = %s, lease_epoch = lease_epoch + 1,
    leased_at = now(), lease_expires_at = now() + interval '30 seconds'
WHERE id IN (SELECT id FROM fleet_workunit WHERE job_id = %s AND state = 'queued' ORDER BY seq LIMIT %s
             FOR UPDATE SKIP LOCKED) RETURNING id, lease_epoch"""


def _setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def _fixture() -> tuple[int, list[int]]:
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from fleet import tokens
    from fleet.models import HardwareGeneration, OwnerPolicy, Vehicle, WorkUnit
    from marketplace.models import AIModel, Allocation, AuctionRound, Job, Organisation, User

    now = timezone.now()
    rng = random.Random(5)
    with transaction.atomic():
        owner = User.objects.create_user(email="bench-owner@example.com", password=None, role=User.Role.OWNER)
        org = Organisation.objects.create(name="Bench buyer", slug="bench-buyer")
        model = AIModel.objects.get(slug="all-minilm-l6-v2")
        job = Job.objects.create(organisation=org, ai_model=model, precision="int8", max_price_micros=2_000_000,
                                 deadline=now + timedelta(hours=2), state=Job.State.RUNNING, started_at=now,
                                 units_total=UNITS, mops_total=UNITS * 24_000, tokens_total=UNITS * 1024)
        text = [{"id": i, "text": "Return a new deque object initialized left-to-right."} for i in range(8)]
        WorkUnit.objects.bulk_create((WorkUnit(job=job, seq=i, inputs=text, tokens=1024, mops=24_000)
                                      for i in range(UNITS)), batch_size=5000)
        hardware = list(HardwareGeneration.objects.filter(code__in=["HW3", "HW4"]))
        cars = Vehicle.objects.bulk_create(
            Vehicle(owner=owner, name=f"Bench car {i}", hardware=rng.choice(hardware), connected=True, last_seen_at=now,
                    battery_pct=80.0, on_wifi=True, plugged_in=True, runtimes=[model.runtime], tasks=[model.task],
                    uplink_kbps=rng.randint(10_000, 50_000), token_prefix=tokens.new_token("dev")[1])
            for i in range(CARS))
        OwnerPolicy.objects.bulk_create(OwnerPolicy(vehicle=car) for car in cars)
        auction_round = AuctionRound.objects.create(market="int8", cleared_at=now, interval_s=60,
                                                    clearing_price_micros=1_000_000)
        Allocation.objects.bulk_create(Allocation(round=auction_round, job=job, vehicle=car, price_micros=1_000_000,
                                                  mops=10**12, remaining_mops=10**12) for car in cars)
    return job.pk, [car.pk for car in cars]


def _reset(job_id: int) -> None:
    from django.db import connection
    from django.utils import timezone

    from fleet.models import Lease, Vehicle, WorkUnit

    Lease.objects.all().delete()
    WorkUnit.objects.filter(job_id=job_id).update(state="queued", leased_to=None, lease_epoch=0, allocation=None)
    Vehicle.objects.update(last_seen_at=timezone.now())
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE fleet_workunit")


def _ours(cars: list[int], seconds: float, start, out) -> None:
    from django.db import connection

    from marketplace.flows import units_lease

    connection.ensure_connection()
    leased, calls, at = [], 0, 0
    start.wait()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        units, _ = units_lease(vehicle_id=cars[at % len(cars)])
        at += 1
        calls += 1
        leased += [(u.pk, u.lease_epoch) for u in units]
    out.put((leased, calls))


def _bare(url: str, job_id: int, car: int, batch: int, seconds: float, start, out) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        leased, calls = [], 0
        start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            leased += conn.execute(BARE_SQL, (car, job_id, batch)).fetchall()
            calls += 1
    out.put((leased, calls))


def _run(target, args_per_leaser: list[tuple], seconds: float) -> dict:
    from django.db import connections

    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(len(args_per_leaser) + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, seconds, start, out)) for args in args_per_leaser]
    for proc in procs:
        proc.start()
    start.wait()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    leased = [ref for refs, _ in results for ref in refs]
    units = [unit for unit, _ in leased]
    calls = sum(c for _, c in results)
    return {"leases_per_s": round(len(leased) / seconds), "double_leases": len(units) - len(set(units)),
            "mean_batch": round(len(leased) / max(1, calls), 1)}


def main(seconds: float, leaser_counts: list[int]) -> dict:
    with throwaway_postgres("bench_leasing") as url:
        env = {**os.environ, "DATABASE_URL": url}
        env.pop("REDIS_URL", None)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
        _setup_django(url)
        job_id, cars = _fixture()
        ours, bare, bare_batched, doubles = {}, {}, {}, 0
        _reset(job_id)
        _run(_ours, [(cars,)], 1.0)  # warm up: caches, connections, the planner
        for n in leaser_counts:
            _reset(job_id)
            share = [(cars[i::n],) for i in range(n)]
            figures = _run(_ours, share, seconds)
            ours[str(n)], doubles = figures, doubles + figures["double_leases"]
            from fleet.models import Lease, WorkUnit

            # Cross-check in the database: every lease row is a distinct (unit, epoch), one per leased unit.
            assert Lease.objects.count() == WorkUnit.objects.filter(state="leased").count()
        batch = max(1, round(ours[str(max(leaser_counts))]["mean_batch"]))
        for n in sorted({1, 4} & set(leaser_counts) or {1}):
            _reset(job_id)
            bare[str(n)] = _run(_bare, [(url, job_id, cars[i], 1) for i in range(n)], seconds)
            _reset(job_id)
            bare_batched[str(n)] = _run(_bare, [(url, job_id, cars[i], batch) for i in range(n)], seconds)
            doubles += bare[str(n)]["double_leases"] + bare_batched[str(n)]["double_leases"]
    at4 = "4" if "4" in ours else str(max(leaser_counts))
    return {
        "bench": "leasing", "profile": "postgresql", "seconds_per_run": seconds,
        "leases_per_s": {n: f["leases_per_s"] for n, f in ours.items()},
        "mean_batch": {n: f["mean_batch"] for n, f in ours.items()},
        "bare_leases_per_s": {n: f["leases_per_s"] for n, f in bare.items()},
        f"bare_batch{batch}_leases_per_s": {n: f["leases_per_s"] for n, f in bare_batched.items()},
        "ratio_vs_raw": round(ours[at4]["leases_per_s"] / bare[at4 if at4 in bare else "1"]["leases_per_s"], 2),
        "ratio_vs_raw_same_batch": round(ours[at4]["leases_per_s"]
                                         / bare_batched[at4 if at4 in bare_batched else "1"]["leases_per_s"], 2),
        "double_leases": doubles,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--leasers", default="1,2,4,8")
    args = parser.parse_args()
    print(json.dumps(main(args.seconds, [int(n) for n in args.leasers.split(",")])))
