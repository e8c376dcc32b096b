"""Chaos: a job through a fleet whose cars misbehave and come and go, with every part real (the product's
processes on loopback, simulated cars running the real agent over websockets). Cars drive away on a
compressed commute, lose WiFi, drop their sockets, stall past their lease, send duplicate, corrupt and late
results. Every unit must still complete exactly once, none be paid twice, and the ledger balance.

Size: CHAOS_UNITS units (300 in the embedded profile, 2,000 in the services profile that CI runs)."""

import asyncio
import json
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from billing.models import LedgerTransaction, MeterRecord
from billing.selectors import unbalanced_transaction_ids
from fleet import services as fleet
from fleet.agent.client import Faults
from fleet.agent.sim import run_fleet
from fleet.models import HardwareGeneration, Lease, Vehicle, WorkUnit
from marketplace import corpus, flows
from marketplace.models import Job
from tests.factories import BuyerFactory, OwnerFactory
from tests.support.live import live_product

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CARS = 16
# Per lease; with the fleet's own drive-aways and WiFi losses about 45 % of leases are disrupted (the issue asks
# for at least 30 %: a 300-unit run once came to 33 % with lower rates).
FAULTS = Faults(drop_socket=0.1, stall=0.1, duplicate=0.12, corrupt=0.1, late=0.06, stall_s=4.0, late_s=1.0, seed=11)
# Fast clocks, so that leases expire, sweeps run and cars commute within the test: a simulated day lasts
# 72 s (time scale 1200), a lease lives 3 s without a heartbeat, and heartbeats come every second.
PRODUCT_ENV = {"AUCTION_INTERVAL_S": "0.5", "LEASE_TTL_S": "3", "HEARTBEAT_INTERVAL_S": "1",
               "LEASE_SWEEP_INTERVAL_S": "0.5", "VEHICLE_STALE_AFTER_S": "4", "DOCS_PER_UNIT": "1"}
OUTPUT = Path(settings.BASE_DIR) / "test-output"


def test_every_unit_completes_exactly_once_through_a_misbehaving_fleet(tmp_path, settings):
    units = 2000 if settings.REDIS_URL else 300
    settings.DOCS_PER_UNIT = 1
    # Given a job of one short document per unit,
    buyer = BuyerFactory()
    docs = [{"id": d["id"], "text": d["text"][:300]} for d in corpus.documents(units)]
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                              precision="int8", max_price_micros=5_000_000, deadline=timezone.now() + timedelta(hours=1),
                              inputs=[json.dumps(d).encode() + b"\n" for d in docs])
    assert job.units_total == units
    # and a fleet of owners' cars on the default limits (WiFi only, battery floor 30 %),
    hardware = list(HardwareGeneration.objects.filter(code__in=["HW3", "HW4"]))
    cars = []
    for i in range(CARS):
        vehicle, code = fleet.vehicle_create(owner=OwnerFactory(), name=f"Chaos car {i}", hardware=hardware[i % 2])
        _, token = fleet.vehicle_pair(code=code)
        cars.append({"name": vehicle.name, "token": token, "hardware_watts": vehicle.hardware.watts, "seed": i})

    with live_product(tmp_path, **PRODUCT_ENV) as (base, procs):
        # when the cars live their compressed days with faults injected,
        stop = asyncio.Event()
        agents: list = []
        failures: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def fleet_thread():
            try:
                loop.run_until_complete(run_fleet(base, cars, stop=stop, time_scale=1200, seed=3, faults=FAULTS,
                                                  telemetry_interval_s=1.0, agents=agents))
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                failures.append(exc)

        thread = threading.Thread(target=fleet_thread, daemon=True)
        thread.start()
        started = time.monotonic()
        limit = 480 if settings.REDIS_URL else 240
        try:
            while Job.objects.get(pk=job.pk).state != Job.State.COMPLETED:
                assert time.monotonic() - started < limit, (
                    f"stuck: {Counter(WorkUnit.objects.filter(job=job).values_list('state', flat=True))}\n{procs.logs()}")
                assert not failures, failures
                time.sleep(1)
            elapsed = time.monotonic() - started
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(90)
        # the fleet stops cleanly while the product is still up (each car releases what it holds and closes)
        assert not thread.is_alive(), f"the fleet did not stop: {[t for t in asyncio.all_tasks(loop) if not t.done()]}"
        assert not failures, failures
        assert len(agents) == CARS

    # then every unit is done, its result paid by the buyer once and booked once, to the car whose result it is;
    # the servers verify as deployed (docs/verification.md), so some units were also computed by a second car
    # of another owner (a check, paid by the platform) or by the platform: every other completed lease is such
    # a check, and no car of this honest fleet had a result found wrong;
    job.refresh_from_db()
    assert job.units_done == units and WorkUnit.objects.filter(job=job, state="done").count() == units
    paid = MeterRecord.objects.filter(job=job, role=MeterRecord.Role.BUYER)
    checks = MeterRecord.objects.filter(job=job, role=MeterRecord.Role.CHECK)
    assert paid.count() == units and not paid.values("unit").annotate(n=Count("pk")).filter(n__gt=1).exists()
    completed = Lease.objects.filter(unit__job=job, outcome="completed")
    assert completed.count() == units + checks.count()
    assert not Lease.objects.filter(unit__job=job, verdict__in=["wrong", "voided", "pending"]).exists()
    charges = LedgerTransaction.objects.filter(job=job, kind=LedgerTransaction.Kind.USAGE)
    assert charges.count() == charges.filter(meter__isnull=False).count() == units  # booked once per unit
    assert LedgerTransaction.objects.filter(job=job, kind=LedgerTransaction.Kind.VERIFICATION).count() == checks.count()
    assert unbalanced_transaction_ids() == []
    for record in paid.select_related("unit"):
        assert record.vehicle_id == record.unit.completed_by_id  # paid to the car whose result was accepted
    assert not Vehicle.objects.filter(name__startswith="Chaos car", suspended_at__isnull=False).exists()

    # while the fleet really was disrupted: at least 30 % of leases ended otherwise than completed, or had a
    # fault injected on them (a dropped socket, a duplicate or late result) that the gateway had to absorb.
    leases = Lease.objects.filter(unit__job=job)
    outcomes = Counter(leases.values_list("outcome", flat=True))
    injected = Counter()
    for agent in agents:
        injected.update(agent.stats.faults_injected)
    absorbed = injected["drop_socket"] + injected["duplicate"] + injected["late"]
    total = sum(outcomes.values())
    disrupted = total - outcomes["completed"] + absorbed
    reasons = Counter(leases.exclude(outcome="completed").values_list("reason", flat=True))
    figures = {"profile": "services" if settings.REDIS_URL else "embedded", "units": units, "cars": CARS,
               "seconds": round(elapsed, 1), "leases": total, "outcomes": dict(outcomes), "faults_injected": dict(injected),
               "disrupted_share": round(disrupted / total, 3), "withdraw_reasons": dict(reasons.most_common(8)),
               "reconnects": sum(a.stats.reconnects for a in agents), "resumed": sum(a.stats.resumed for a in agents),
               "results_rejected": sum(a.stats.results_rejected for a in agents), "checks": checks.count(),
               "verdicts": dict(Counter(leases.exclude(verdict="").values_list("verdict", flat=True)))}
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / f"chaos-{figures['profile']}.json").write_text(json.dumps(figures))
    print("chaos:", json.dumps(figures))
    assert disrupted >= 0.3 * total, figures
    assert outcomes["expired"] > 0 and figures["results_rejected"] > 0 and figures["resumed"] > 0, figures
