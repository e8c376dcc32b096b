"""Every workload end to end (docs/workloads.md): a buyer's job of each workload through the REST API, computed
by real car agent processes over the real gateway (the embedded profile; the services profile in CI), with
verification as deployed, and its results read back in the workload's own format."""

import json
import sys
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from fleet import services as fleet
from fleet.agent.pages import error_rate
from fleet.models import HardwareGeneration, VehicleDailyUsage
from marketplace import corpus, services
from tests.factories import BuyerFactory, OwnerFactory
from tests.marketplace.test_classification import CLASSIFIER, DOCUMENTS, LABELS
from tests.support.live import live_product

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CARS = 2


def buyer_and_cars(name: str):
    """A buyer's API key, and CARS cars of as many owners (so replicas can be checked) with their pairing codes."""
    buyer = BuyerFactory()
    _, key = services.api_key_create(organisation=buyer.organisation, name="e2e", created_by=buyer)
    hw4 = HardwareGeneration.objects.get(code="HW4")
    return key, [fleet.vehicle_create(owner=OwnerFactory(), name=f"{name} {i}", hardware=hw4) for i in range(CARS)]


def start_agents(base: str, procs, tmp_path, codes: list[str], key: str) -> httpx.Client:
    """Real agent processes paired with ``codes``, connected; returns the buyer's API client."""
    for i, code in enumerate(codes):
        procs.start(f"agent{i}", [sys.executable, "-m", "fleet.agent", "--server", base, "--pair", code,
                                  "--state-file", str(tmp_path / f"agent{i}.json"), "--battery", "85",
                                  "--plugged-in", "--wifi"], FLEET_ORT_THREADS="1")
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    deadline = time.monotonic() + 60
    while api.get("/healthz").json()["vehicles_connected"] < len(codes):
        assert time.monotonic() < deadline, procs.logs()
        time.sleep(0.3)
    return api


def test_a_classification_job_is_labelled_by_real_agents_over_the_gateway(tmp_path):
    # Given a buyer with an API key, and two owners' cars with their real agents connected,
    key, cars = buyer_and_cars("Workload car")
    documents = DOCUMENTS * 3
    with live_product(tmp_path, AUCTION_INTERVAL_S="0.5") as (base, procs):
        api = start_agents(base, procs, tmp_path, [code for _, code in cars], key)
        # when the buyer submits a classification job with its labels,
        response = api.post("/api/v1/jobs/", json={
            "model": CLASSIFIER, "precision": "int8", "max_price_micros": 2_000_000,
            "deadline": (timezone.now() + timedelta(hours=1)).isoformat(), "params": {"labels": LABELS},
            "inputs": [{"id": f"doc-{i}", "text": text} for i, (text, _) in enumerate(documents)]})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        # then real agents label every document, and the results name the labels,
        deadline = time.monotonic() + 120
        while (state := api.get(f"/api/v1/jobs/{job_id}/").json())["state"] != "completed":
            assert time.monotonic() < deadline, f"job stuck: {state}\n{procs.logs()}"
            time.sleep(0.5)
        rows = [json.loads(line) for line in api.get(f"/api/v1/jobs/{job_id}/results/").text.splitlines()]
    assert [(row["id"], row["label"]) for row in rows] == [
        (f"doc-{i}", label) for i, (_, label) in enumerate(documents)]
    assert all(set(row["scores"]) == {label["name"] for label in LABELS} for row in rows)


def test_an_ocr_job_is_read_by_real_agents_that_fetch_its_pages_by_url(tmp_path):
    # Given a buyer with an API key and two owners' cars with their real agents connected,
    key, cars = buyer_and_cars("Reader")
    pages = corpus.page_documents(6)
    with live_product(tmp_path, AUCTION_INTERVAL_S="0.5") as (base, procs):
        api = start_agents(base, procs, tmp_path, [code for _, code in cars], key)
        # when the buyer submits page images through the job API (priced per thousand pages),
        response = api.post("/api/v1/jobs/", json={
            "model": "rapidocr-pp-ocrv4", "precision": "fp32", "max_price_micros": 2_000_000,
            "deadline": (timezone.now() + timedelta(hours=1)).isoformat(), "inputs": pages})
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["task"], job["price_unit"], job["tokens_total"]) == ("ocr", "per thousand pages", 6)
        # then real agents fetch each unit's pages by URL (no unit.assign carries an image) and read them,
        deadline = time.monotonic() + 240
        while (state := api.get(f"/api/v1/jobs/{job['id']}/").json())["state"] != "completed":
            assert time.monotonic() < deadline, f"job stuck: {state}\n{procs.logs()}"
            time.sleep(0.5)
        rows = [json.loads(line) for line in api.get(f"/api/v1/jobs/{job['id']}/results/").text.splitlines()]
    assert [row["id"] for row in rows] == [page["id"] for page in pages]
    rates = [error_rate(row["text"], truth) for row, truth in zip(rows, corpus.page_texts(6))]
    assert max(rates) < 0.08, rates
    # and the pages they fetched count against their owners' data.
    fetched = sum(VehicleDailyUsage.objects.filter(vehicle__in=[car for car, _ in cars]).values_list("data_bytes", flat=True))
    assert fetched >= sum(len(page["image"]) for page in pages)
