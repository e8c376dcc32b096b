"""The owner portal in headless Chromium against the real server, with a real car agent process: an owner
signs up, adds a car, sets its limits, pairs the agent, watches it come online and work, and pauses it; the
time from the Pause click to the car page saying "paused" and the car holding no work is measured."""

import json
import re
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.utils import timezone
from playwright.sync_api import expect

from billing.services import balance_grant
from fleet.models import Lease, Vehicle, WorkUnit
from marketplace import corpus, flows, services as market
from marketplace.models import User
from tests.browser.test_pages import sign_up
from tests.conftest import jsonl
from tests.factories import OrganisationFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

OUTPUT = Path(settings.BASE_DIR) / "test-output"
ZONE = "Europe/Paris"
DOCS = 2000  # enough work that the car is still busy when the owner pauses it
PAUSE_BUDGET_MS = 2000


def leased_to(vehicle) -> list[int]:
    return list(WorkUnit.objects.filter(leased_to=vehicle, state=WorkUnit.State.LEASED).values_list("pk", flat=True))


def agent_heard(log: Path) -> tuple[dict[int, float], set[int]]:
    """What the agent's log says about withdrawn units: {unit: wall-clock time it dropped it for the pause},
    and the units whose result it had already sent when the withdrawal arrived (refused as stale, unpaid)."""
    dropped, stale = {}, set()
    for line in log.read_text(errors="replace").splitlines():
        if match := re.search(r"unit (\d+) withdrawn \(paused\)", line):
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # logging's asctime, local time
            dropped.setdefault(int(match[1]), stamp.timestamp())
        elif match := re.search(r"result for unit (\d+) rejected: stale_lease", line):
            stale.add(int(match[1]))
    return dropped, stale


def test_an_owner_sets_limits_pairs_a_real_agent_sees_it_work_and_pauses_it_within_two_seconds(
        page, screenshot, live, tmp_path):
    base_url, procs = live
    OrganisationFactory(name="Shady Ads Ltd")

    # Given a newcomer who signs up as a car owner and adds a car,
    sign_up(page, email="rosalind@franklin.example", role="owner")
    expect(page).to_have_url(re.compile(r"/owner/$"))
    form = page.locator("form#add-car")
    form.get_by_label("Name").fill("Silver Ioniq")
    form.get_by_label("Hardware").select_option("HW4")
    form.get_by_role("button", name="Add car").click()
    owner = User.objects.get(email="rosalind@franklin.example")
    vehicle = Vehicle.objects.get(owner=owner)

    # when they open the car's page, it is offline and has earned nothing yet;
    page.get_by_role("link", name="Silver Ioniq", exact=True).click()
    expect(page).to_have_url(re.compile(rf"/owner/cars/{vehicle.pk}/$"))
    expect(page.get_by_test_id("car-status")).to_have_text("Offline")
    expect(page.get_by_test_id("car-earnings")).to_have_text("0.00 ¢")

    # when they open its limits and ask to stop at 40 % but resume above 30 %,
    page.get_by_role("link", name="Edit limits").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Limits for Silver Ioniq")
    page.get_by_label("Stop working at").fill("40")
    page.get_by_label("Start again only above").fill("30")
    page.get_by_role("button", name="Save limits").click()

    # then the form is refused, with the reason at the top and next to the resume level, and nothing saved;
    expect(page.locator("#id_battery_resume_pct_error")).to_contain_text("Set it above 40 %.")
    expect(page.locator(".messages")).to_contain_text("The resume level must be above the stop level")
    screenshot(page, "owner-portal-limits-error")
    vehicle.policy.refresh_from_db()
    assert (vehicle.policy.battery_floor_pct, vehicle.policy.battery_resume_pct) == (30, 35)

    # when they set a floor of 20 % resuming above 30 %, WiFi only, two overlapping windows today and all of
    # tomorrow (in their time zone), a departure, a daily energy budget, embeddings only, a blocked buyer and
    # a minimum price,
    local = timezone.now().astimezone(ZoneInfo(ZONE))
    today, tomorrow, later = local.weekday(), (local.weekday() + 1) % 7, (local.weekday() + 3) % 7
    page.get_by_label("Stop working at").fill("20")
    page.get_by_label("Start again only above").fill("30")
    page.get_by_label("Your time zone").select_option(ZONE)
    for row, (day, start, end) in enumerate([(today, "00:00", "13:00"), (today, "12:00", "00:00"),
                                             (tomorrow, "00:00", "00:00")], start=1):
        page.get_by_label(f"Window {row} day", exact=True).select_option(str(day))
        page.get_by_label(f"Window {row} from", exact=True).fill(start)
        page.get_by_label(f"Window {row} to", exact=True).fill(end)
    page.get_by_label("Departure 1 day", exact=True).select_option(str(later))
    page.get_by_label("Departure 1 leave at", exact=True).fill("07:30")
    page.get_by_label("Departure 1 charge needed (%)", exact=True).fill("70")
    page.get_by_label("Energy per day").fill("5")
    expect(page.get_by_label("Only on WiFi")).to_be_checked()
    page.get_by_role("radio", name="Only the kinds ticked below").check()
    page.get_by_role("checkbox", name=re.compile(r"^Embeddings")).check()
    page.get_by_role("checkbox", name="Shady Ads Ltd").check()
    page.get_by_label("Minimum price").fill("1000")
    page.get_by_role("button", name="Save limits").click()

    # then they are saved, and the page says the overlapping windows were merged.
    expect(page.locator(".messages")).to_contain_text("Limits saved; they apply now. Overlapping windows were merged")
    screenshot(page, "owner-portal-limits-saved")
    policy = Vehicle.objects.get(pk=vehicle.pk).policy
    assert (policy.battery_floor_pct, policy.battery_resume_pct, policy.wifi_only) == (20, 30, True)
    assert policy.timezone == ZONE and policy.categories == ["embedding"] and policy.reserve_price_micros == 1000
    assert sorted((w["weekday"], w["start"], w["end"]) for w in policy.windows) == sorted(
        [(today, "00:00", "00:00"), (tomorrow, "00:00", "00:00")])  # 48 hours, in windows of a day
    assert [o.name for o in policy.blocked_organisations.all()] == ["Shady Ads Ltd"]

    # When they get a pairing code on the car's page and start a real agent with it,
    page.get_by_role("link", name="Back to the car").click()
    page.get_by_role("button", name="New pairing code").click()
    code = page.get_by_test_id("pairing-code").inner_text()
    agent_log = tmp_path / "agent.log"
    procs.start("agent", [sys.executable, "-m", "fleet.agent", "--server", base_url, "--pair", code,
                          "--state-file", str(tmp_path / "agent.json"), "--battery", "85", "--plugged-in", "--wifi"],
                FLEET_ORT_THREADS="1")

    # then the car page comes alive by itself: parked and idle, on WiFi, with its battery and next departure.
    expect(page.get_by_test_id("car-status")).to_have_text("Parked and idle", timeout=30_000)
    expect(page.get_by_test_id("battery")).to_have_text("85 %")
    expect(page.get_by_test_id("next-departure")).to_contain_text("70 %")

    # The dashboard shows it online too.
    page.get_by_role("navigation", name="Breadcrumb").get_by_role("link", name="My cars").click()
    row = page.get_by_test_id(f"car-{vehicle.pk}")
    expect(row.locator(".badge")).to_have_text("Parked and idle")
    expect(row).to_contain_text("online")
    screenshot(page, "owner-portal-dashboard-online")

    # When a buyer submits a job,
    buyer = market.buyer_create(email="buyer@acme.example", organisation_name="Acme Search")
    balance_grant(organisation=buyer.organisation, amount_minor=1_000, note="trial credit")  # buyers pay in advance
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2", precision="int8",
                            max_price_micros=2_000_000, deadline=timezone.now() + timedelta(hours=1),
                            inputs=jsonl(corpus.documents(DOCS)).splitlines(keepends=True))

    # then (the auction runs every 2 s) the car starts working on it, and its page and the dashboard say so.
    expect(row.locator(".badge")).to_have_text("Working", timeout=30_000)
    row.get_by_role("link", name="Silver Ioniq", exact=True).click()
    expect(page.get_by_test_id("car-status")).to_have_text("Working", timeout=10_000)
    expect(page.get_by_test_id("current-work")).to_contain_text(f"Job #{job.pk}")
    expect(page.get_by_test_id("units-done")).not_to_have_text("0", timeout=10_000)
    expect(page.get_by_test_id("car-earnings")).not_to_have_text("0.00 ¢", timeout=10_000)
    screenshot(page, "owner-portal-car-working")

    # When the owner presses Pause while the car holds work,
    deadline = time.monotonic() + 10
    while not (held := leased_to(vehicle)):
        assert time.monotonic() < deadline, "the car held no work to withdraw"
        time.sleep(0.02)
    clicked_at, started = time.time(), time.monotonic()
    page.get_by_role("button", name="Pause", exact=True).click()

    # then within 2 seconds the car page says paused and the car holds no work in the database,
    expect(page.get_by_test_id("car-status")).to_have_text("Paused", timeout=5_000)
    page_ms = (time.monotonic() - started) * 1000
    while leased_to(vehicle):
        assert time.monotonic() - started < 5, "the car's leases were not withdrawn"
        time.sleep(0.01)
    ms = round((time.monotonic() - started) * 1000)
    print("pause_to_withdrawn_ms", ms)

    # the units it held were requeued or had just been completed (never lost), and the agent was told.
    for unit in WorkUnit.objects.filter(pk__in=held):
        assert unit.leased_to_id != vehicle.pk or unit.state != WorkUnit.State.LEASED
    paused_units = set(Lease.objects.filter(vehicle=vehicle, outcome=Lease.Outcome.WITHDRAWN, reason="paused")
                       .values_list("unit_id", flat=True))
    withdrawn = len(paused_units)
    # Each withdrawn unit reached the car: it dropped it, or it had just sent its result, which was refused.
    deadline = time.monotonic() + 3
    while True:
        dropped, stale = agent_heard(agent_log)
        if paused_units <= set(dropped) | stale or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert paused_units <= set(dropped) | stale, agent_log.read_text(errors="replace")[-2000:]
    told = [at for unit, at in dropped.items() if unit in paused_units]
    car_ms = round((min(told) - clicked_at) * 1000) if told else None
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "pause-latency.json").write_text(json.dumps({
        "pause_to_withdrawn_ms": ms, "pause_to_page_paused_ms": round(page_ms), "pause_to_agent_told_ms": car_ms,
        "units_held_at_click": len(held), "leases_withdrawn": withdrawn}) + "\n")
    expect(page.get_by_test_id("current-work")).to_have_text("No work on the car right now.")
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    screenshot(page, "owner-portal-car-paused")
    assert ms < PAUSE_BUDGET_MS, f"pause took {ms} ms"
    if car_ms is not None:
        assert car_ms < PAUSE_BUDGET_MS, f"the pause reached the car after {car_ms} ms"

    # When the owner resumes it, it goes back to work.
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_test_id("car-status")).to_have_text(re.compile("Working|Parked and idle"), timeout=10_000)

    # When they rotate the car's token, the new one is shown once, with the command that restarts the agent,
    # and the old connection is closed: the car goes offline (and its work back to the queue).
    page.get_by_role("button", name="Rotate token").click()
    expect(page.get_by_test_id("agent-command")).to_contain_text(f"python -m fleet.agent --server {base_url} --token dev_")
    screenshot(page, "owner-portal-token-rotated")
    expect(page.get_by_test_id("car-status")).to_have_text("Offline", timeout=15_000)
    assert not leased_to(vehicle)

    # When they remove the car, they are asked first; then it is gone from the dashboard, its history kept.
    page.get_by_role("link", name="Remove this car…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Remove Silver Ioniq?")
    screenshot(page, "owner-portal-remove-confirm")
    page.get_by_role("button", name="Remove Silver Ioniq").click()
    expect(page).to_have_url(re.compile(r"/owner/$"))
    expect(page.get_by_text("Silver Ioniq is removed")).to_be_visible()
    expect(page.get_by_text("No cars yet")).to_be_visible()
    assert Vehicle.objects.get(pk=vehicle.pk).removed_at is not None
    assert WorkUnit.objects.filter(completed_by=vehicle).exists()
