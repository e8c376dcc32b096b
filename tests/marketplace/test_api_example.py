"""docs/examples/submit_job.py against the live product (the active profile) and two real car agents: with
its defaults it submits, waits with a progress line and writes every result in input order; a second run
bids the documented margin over the price the first one cleared at."""

import json
import math
import subprocess
import sys
import time

import httpx
import pytest

from fleet import services as fleet
from fleet.models import HardwareGeneration
from marketplace import corpus, services
from marketplace.models import AuctionRound, IdempotencyKey, Job
from tests.conftest import jsonl
from tests.factories import BuyerFactory, OwnerFactory
from tests.support.live import ROOT, live_product

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

EXAMPLE = ROOT / "docs" / "examples" / "submit_job.py"
CARS = 2


def run_example(base: str, key: str, inputs, out, procs) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(EXAMPLE), "--base-url", base, "--api-key", key, "--input", str(inputs),
                          "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{procs.logs()}"
    return run


def test_the_example_client_submits_a_job_waits_and_downloads_the_results(tmp_path):
    # Given a buyer's key, two paired cars, and a JSON Lines file,
    buyer = BuyerFactory()
    _, key = services.api_key_create(organisation=buyer.organisation, name="example", created_by=buyer)
    hw4 = HardwareGeneration.objects.get(code="HW4")
    codes = [fleet.vehicle_create(owner=OwnerFactory(), name=f"Example car {i}", hardware=hw4)[1] for i in range(CARS)]
    docs = corpus.documents(40)
    (tmp_path / "docs.jsonl").write_bytes(jsonl(docs))
    (tmp_path / "more.jsonl").write_bytes(jsonl(corpus.documents(8)))

    with live_product(tmp_path, AUCTION_INTERVAL_S="0.5") as (base, procs):
        for i, code in enumerate(codes):
            procs.start(f"agent{i}", [sys.executable, "-m", "fleet.agent", "--server", base, "--pair", code,
                                      "--state-file", str(tmp_path / f"agent{i}.json"), "--battery", "85",
                                      "--plugged-in", "--wifi"], FLEET_ORT_THREADS="1")
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/healthz").json()["vehicles_connected"] < CARS:
            assert time.monotonic() < deadline, procs.logs()
            time.sleep(0.3)
        # when the example runs with its defaults,
        first = run_example(base, key, tmp_path / "docs.jsonl", tmp_path / "results.jsonl", procs)
        # and again, once the market has a price,
        last_price = AuctionRound.objects.filter(market="int8", clearing_price_micros__isnull=False).latest().clearing_price_micros
        run_example(base, key, tmp_path / "more.jsonl", tmp_path / "more-results.jsonl", procs)

    # then the first job ran on the default model at the fallback bid, showing its progress,
    job, second = Job.objects.order_by("pk")
    assert (job.ai_model.slug, job.precision, job.state, job.max_price_micros) == ("all-minilm-l6-v2", "int8", "completed", 1_000_000)
    assert f"job {job.pk}: completed 100 % (5/5 units)" in first.stdout
    assert IdempotencyKey.objects.filter(response_status=201).count() == 2
    # every result is there, in input order,
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [d["id"] for d in docs]
    assert all(len(r["embedding"]) == 384 for r in results)
    # and the second bid the last clearing price plus 25 %.
    assert second.state == "completed" and second.max_price_micros == max(1, math.ceil(last_price * 1.25))
