"""A buyer's whole journey in headless Chromium against the real product and two real car agents: sign in,
create a job on the page with its estimate, watch the progress bar reach 100 %, download the results."""

import json
import re
import sys
import time

import pytest
from playwright.sync_api import expect

from fleet import services as fleet
from fleet.models import HardwareGeneration, Vehicle, OwnerPolicy
from marketplace import corpus
from marketplace.models import Job
from tests.conftest import jsonl
from tests.factories import BuyerFactory, OwnerFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

DOCS = 48  # six units of eight documents
CARS = 2


def test_a_buyer_creates_a_job_on_the_page_watches_it_finish_and_downloads_the_results(live, page, screenshot, tmp_path):
    base, procs = live
    # Given two parked cars on the gateway, their agents real processes,
    hardware = HardwareGeneration.objects.get(code="HW4")
    for i in range(CARS):
        vehicle, code = fleet.vehicle_create(owner=OwnerFactory(), name=f"Journey car {i}", hardware=hardware)
        # (set directly: the service would push the change over the channel layer from Playwright's loop thread)
        OwnerPolicy.objects.filter(vehicle=vehicle).update(reserve_price_micros=10_000)
        procs.start(f"agent{i}", [sys.executable, "-m", "fleet.agent", "--server", base, "--pair", code,
                                  "--state-file", str(tmp_path / f"agent{i}.json"), "--battery", "85",
                                  "--plugged-in", "--wifi"], FLEET_ORT_THREADS="1")
    deadline = time.monotonic() + 60
    while Vehicle.objects.filter(connected=True).count() < CARS:
        assert time.monotonic() < deadline, procs.logs()
        time.sleep(0.3)
    buyer = BuyerFactory(password="pw-for-tests-1")

    # when the buyer signs in and opens the new-job page,
    page.goto("/accounts/login/")
    page.get_by_label("Email").fill(buyer.email)
    page.get_by_label("Password").fill("pw-for-tests-1")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_test_id("new-job").click()

    # and chooses a file of 48 documents, the page estimates cost and time from the two cars offering now,
    docs = corpus.documents(DOCS)
    page.get_by_label("Inputs").set_input_files({"name": "docs.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(docs)})
    expect(page.get_by_test_id("estimate-time")).to_contain_text(re.compile(r"about .+ with the 2 cars offering now"))
    screenshot(page, "journey-new-job-estimate")
    page.get_by_role("button", name="Create job").click()

    # then the job's page shows its progress bar, which reaches 100 % as the cars compute,
    expect(page).to_have_url(re.compile(r"/buyer/jobs/\d+/$"), timeout=30_000)
    job = Job.objects.get(organisation=buyer.organisation)
    deadline = time.monotonic() + 90
    while Job.objects.get(pk=job.pk).state != Job.State.COMPLETED:
        assert time.monotonic() < deadline, f"job stuck: {Job.objects.get(pk=job.pk).units_done} done\n{procs.logs()}"
        time.sleep(0.5)
    expect(page.get_by_test_id("progress-pct")).to_have_text("100 %", timeout=10_000)
    expect(page.locator("#progress .badge.completed")).to_be_visible()
    expect(page.get_by_test_id("history")).to_contain_text("Completed")
    expect(page.get_by_role("progressbar", name="Units computed")).to_have_attribute("aria-valuenow", str(job.units_total))
    screenshot(page, "journey-job-completed")

    # and the results download as JSON Lines in input order, one embedding per document.
    with page.expect_download() as download_info:
        page.get_by_test_id("download").click()
    download = download_info.value
    assert download.suggested_filename == f"job-{job.pk}-results.jsonl"
    rows = [json.loads(line) for line in open(download.path())]
    assert [row["id"] for row in rows] == [doc["id"] for doc in docs]
    assert all(len(row["embedding"]) == 384 for row in rows)
