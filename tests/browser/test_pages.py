"""The product's pages in headless Chromium against the real server: what a newcomer, an owner, an anonymous
visitor and an operator see and do. Every step leaves a full-page screenshot in test-output/screenshots/."""

import re
from datetime import timedelta

import pytest
from allauth.account.models import EmailAddress, EmailConfirmationHMAC
from django.utils import timezone
from playwright.sync_api import expect

from billing.services import balance_grant
from fleet.models import Vehicle
from marketplace import corpus
from marketplace.models import AuctionRound, Job, User
from tests.conftest import jsonl
from tests.factories import VehicleFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery 9"
ROLES = {"buyer": "I buy inference capacity", "owner": "I own a car"}


def sign_up(page, *, email: str, role: str, organisation: str = "") -> None:
    page.goto("/accounts/signup/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    page.get_by_role("radio", name=ROLES[role]).check()
    if organisation:
        page.get_by_role("textbox", name="Organisation").fill(organisation)
    page.get_by_role("button", name="Sign up").click()


def test_a_new_buyer_signs_up_creates_a_job_sees_line_errors_and_gets_an_api_key(page, screenshot):
    # Given a newcomer on the sign-up page,
    # when they sign up as a buyer for an organisation,
    sign_up(page, email="ada@lovelace.example", role="buyer", organisation="Analytical Engines Ltd")

    # then they land on their organisation's dashboard, which has no jobs yet.
    expect(page).to_have_url(re.compile(r"/buyer/$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Analytical Engines Ltd")
    expect(page.get_by_text("No jobs yet")).to_be_visible()
    screenshot(page, "buyer-dashboard-empty")
    user = User.objects.get(email="ada@lovelace.example")
    assert user.role == User.Role.BUYER and user.organisation.name == "Analytical Engines Ltd"

    # When they create a job from a JSON Lines file of 20 documents (8 per unit: 3 units) on the new-job page,
    page.get_by_test_id("new-job").click()
    form = page.locator("form#new-job")
    form.get_by_label("Precision").select_option("int8")
    form.get_by_label("Inputs").set_input_files(
        {"name": "docs.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(corpus.documents(20))})
    # (the page reads the file and estimates the job before it is sent: no car is parked yet)
    expect(page.get_by_test_id("estimate")).to_contain_text(re.compile(r"Documents\s*20 \(about [\d,]+ tokens\)"))
    expect(page.get_by_test_id("estimate-time")).to_contain_text("No car offers INT8 capacity")
    # (and says the job will reserve its cost at the bid, which their empty balance does not cover)
    expect(page.get_by_test_id("balance-warning")).to_contain_text("Your balance is $0.00")
    screenshot(page, "buyer-new-job-estimate")
    form.get_by_role("button", name="Create job").click()

    # then nothing is created and the page says why, with the way to top up;
    expect(page.locator(".form-errors")).to_contain_text("does not cover")
    assert not Job.objects.exists()
    screenshot(page, "buyer-new-job-no-balance")
    # once the balance is funded (here by the platform's credit; card top-ups have their own test), it works.
    balance_grant(organisation=user.organisation, amount_minor=1_000, note="trial credit")
    form = page.locator("form#new-job")
    form.get_by_label("Precision").select_option("int8")
    form.get_by_label("Inputs").set_input_files(
        {"name": "docs.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(corpus.documents(20))})
    expect(page.get_by_test_id("estimate")).to_contain_text("Documents")
    expect(page.get_by_test_id("balance-warning")).to_have_count(0)
    form.get_by_role("button", name="Create job").click()

    # then the job's page shows its progress bar at 0 of 3 units.
    expect(page).to_have_url(re.compile(r"/buyer/jobs/\d+/$"))
    job = Job.objects.get(organisation=user.organisation)
    expect(page).to_have_url(re.compile(rf"/buyer/jobs/{job.pk}/$"))
    expect(page.locator(".bar.big")).to_be_visible()
    expect(page.get_by_test_id("progress-text")).to_contain_text("0 of 3 units")
    expect(page.get_by_text("20 documents in 3 work units")).to_be_visible()
    screenshot(page, "buyer-job-detail")

    # When they upload a malformed file,
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    expect(page.get_by_test_id("jobs")).to_contain_text(f"#{job.pk}")
    screenshot(page, "buyer-dashboard-with-job")
    bad = b'{"text": "fine"}\nnot json\n{"text": ""}\n[1, 2]\n'
    page.get_by_test_id("new-job").click()
    form = page.locator("form#new-job")
    form.get_by_label("Inputs").set_input_files({"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad})
    form.get_by_role("button", name="Create job").click()

    # then the page names each bad line next to the file field, and no job was created.
    errors = page.locator("#id_inputs_error")
    expect(errors).to_contain_text("Line 2: not valid JSON")
    expect(errors).to_contain_text('Line 3: "text" must be a non-empty string')
    expect(errors).to_contain_text("Line 4: each line must be a JSON object")
    expect(page.get_by_text("3 line(s) of the inputs file are not valid")).to_be_visible()
    screenshot(page, "buyer-job-upload-errors")
    assert Job.objects.filter(organisation=user.organisation).count() == 1

    # When they create an API key on their dashboard,
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    page.get_by_label("Key name").fill("batch pipeline")
    page.get_by_role("button", name="Create key").click()

    # then the secret is shown once, and only its prefix afterwards.
    secret = page.get_by_test_id("new-key").inner_text()
    assert secret.startswith("mk_")
    key = user.organisation.api_keys.get()
    assert key.name == "batch pipeline" and secret.startswith(f"mk_{key.prefix}_")
    screenshot(page, "buyer-api-key-created")
    page.reload()
    expect(page.get_by_test_id("new-key")).to_have_count(0)
    expect(page.get_by_test_id("keys")).to_contain_text(key.prefix)
    assert secret not in page.content()


def test_a_car_owner_signs_up_adds_a_car_pairs_and_pauses_it(page, screenshot):
    # Given a newcomer on the sign-up page, where "car owner" is the default role and the organisation field,
    # which only buyers need, is hidden until they choose "buyer",
    page.goto("/accounts/signup/")
    expect(page.get_by_role("radio", name=ROLES["owner"])).to_be_checked()
    expect(page.get_by_role("textbox", name="Organisation")).to_be_hidden()
    screenshot(page, "account-signup")
    page.get_by_role("radio", name=ROLES["buyer"]).check()
    expect(page.get_by_role("textbox", name="Organisation")).to_be_visible()

    # when they sign up as a car owner,
    sign_up(page, email="grace@hopper.example", role="owner")

    # then they land on an empty owner dashboard.
    expect(page).to_have_url(re.compile(r"/owner/$"))
    expect(page.get_by_text("No cars yet")).to_be_visible()
    screenshot(page, "owner-dashboard-empty")
    owner = User.objects.get(email="grace@hopper.example")
    assert owner.role == User.Role.OWNER and owner.organisation is None

    # When they add a car,
    form = page.locator("form#add-car")
    form.get_by_label("Name").fill("Blue Model Y")
    form.get_by_label("Hardware").select_option("HW4")
    form.get_by_role("button", name="Add car").click()

    # then they see its pairing code and the car, offline until its agent connects.
    code = page.get_by_test_id("pairing-code").inner_text()
    assert re.fullmatch(r"[A-Z0-9-]{6,}", code), code
    vehicle = Vehicle.objects.get(owner=owner)
    row = page.get_by_test_id(f"car-{vehicle.pk}")
    expect(row).to_contain_text("Blue Model Y")
    expect(row.locator(".badge")).to_have_text("Offline")
    screenshot(page, "owner-car-added-pairing-code")

    # When they pause it, the badge says so; when they resume it, it is back to offline.
    row.get_by_role("button", name="Pause").click()
    row = page.get_by_test_id(f"car-{vehicle.pk}")
    expect(row.locator(".badge")).to_have_text("Paused")
    expect(page.get_by_text("Blue Model Y is paused")).to_be_visible()
    expect(page.get_by_test_id("pairing-code")).to_have_count(0)
    screenshot(page, "owner-car-paused")
    vehicle.policy.refresh_from_db()
    assert vehicle.policy.paused

    row.get_by_role("button", name="Resume").click()
    expect(page.get_by_test_id(f"car-{vehicle.pk}").locator(".badge")).to_have_text("Offline")
    vehicle.policy.refresh_from_db()
    assert not vehicle.policy.paused


def test_an_anonymous_visitor_sees_the_market_and_its_price_chart(page, screenshot):
    # Given a market with no rounds yet, the home page says so instead of drawing an empty chart.
    page.goto("/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Parked cars, working for AI")
    expect(page.get_by_text("No rounds yet")).to_be_visible()
    screenshot(page, "home-anonymous-empty")

    # Given rounds of two markets over the last minutes (one without a trade),
    now = timezone.now()
    for i in range(12):
        at = now - timedelta(seconds=20 * (12 - i))
        AuctionRound.objects.create(market="int8", cleared_at=at, interval_s=20, offered_mops=9_000_000,
                                    demanded_mops=4_000_000, sold_mops=4_000_000 + 150_000 * i,
                                    clearing_price_micros=None if i == 5 else 1_800 + 90 * (i % 4) + 20 * i)
        if i % 2 == 0:
            AuctionRound.objects.create(market="fp32", cleared_at=at, interval_s=20, offered_mops=800_000,
                                        demanded_mops=500_000, sold_mops=500_000,
                                        clearing_price_micros=6_500 - 150 * i)
    VehicleFactory()

    # when an anonymous visitor opens the home page,
    page.reload()

    # then a chart per market draws its clearing prices, each described for screen readers,
    charts = page.get_by_test_id("price-chart").get_by_role("img")
    expect(charts).to_have_count(2)
    expect(charts.first).to_have_accessible_name(re.compile(r"^Clearing prices of the FP32 market"))
    expect(charts.last).to_have_accessible_name(re.compile(r"^Clearing prices of the INT8 market .*without a trade"))
    expect(charts.locator("polyline")).to_have_count(2)
    expect(page.get_by_test_id("cars-online")).to_have_text("1")
    expect(page.get_by_role("link", name="Sign up")).to_be_visible()
    screenshot(page, "home-anonymous")

    # When they open the market page,
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Market").click()
    # then it charts prices, offered against sold capacity, and the depth of supply of the car offering now.
    expect(page.get_by_test_id("price-chart").get_by_role("img")).to_have_count(2)
    capacity = page.get_by_test_id("capacity-chart").get_by_role("img")
    expect(capacity).to_have_count(2)
    expect(capacity.last).to_have_accessible_name(re.compile(r"^INT8: .* mega-ops offered and .* sold \(\d+ %\) over 12 rounds"))
    depth = page.get_by_test_id("depth-chart").get_by_role("img")
    expect(depth.first).to_have_accessible_name(re.compile(r"supply now: .* mega-ops per second from reserves of 100,000"))
    expect(page.get_by_test_id("market-int8")).to_contain_text("1 car offering now")
    screenshot(page, "market")


def test_an_operator_signs_in_to_the_admin_and_lists_the_vehicles(page, screenshot):
    # Given an operator account and a car,
    User.objects.create_superuser("ops@fleet.example", PASSWORD)
    car = VehicleFactory(name="Red Model 3")

    # when the operator signs in to the admin site,
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/"))
    screenshot(page, "admin-login")
    page.get_by_label("Email").fill("ops@fleet.example")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("link", name="Vehicles")).to_be_visible()

    # then the vehicles' changelist lists the car.
    page.goto("/admin/fleet/vehicle/")
    expect(page.locator("#result_list")).to_contain_text("Red Model 3")
    screenshot(page, "admin-vehicle-changelist")
    assert car.pk


def test_the_account_pages_fit_the_site_layout(page, screenshot):
    # Given a buyer who forgets the organisation on the sign-up form,
    sign_up(page, email="kay@example.com", role="buyer")

    # then the form is refused with the message next to the field, and the typed email is kept.
    expect(page.locator("#id_organisation_error")).to_contain_text("Buyers sign up for an organisation")
    expect(page.get_by_label("Email")).to_have_value("kay@example.com")
    screenshot(page, "account-signup-error")
    assert not User.objects.filter(email="kay@example.com").exists()

    # When they fill it in, they are in, and a confirmation mail went out (verification is optional).
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password (again)").fill(PASSWORD)
    page.get_by_role("textbox", name="Organisation").fill("Kay Labs")
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(re.compile(r"/buyer/$"))

    # When they follow the confirmation link, they confirm their address.
    address = EmailAddress.objects.get(email="kay@example.com")
    page.goto(f"/accounts/confirm-email/{EmailConfirmationHMAC(address).key}/")
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile("Confirm email address", re.I))
    screenshot(page, "account-email-confirm")
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_text("You have confirmed kay@example.com")).to_be_visible()
    address.refresh_from_db()
    assert address.verified

    # When they sign out, they confirm on a page of our layout and are signed out.
    page.goto("/accounts/logout/")
    expect(page.get_by_role("heading", level=1)).to_have_text(re.compile("Sign out", re.I))
    screenshot(page, "account-logout-confirm")
    page.locator("main").get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Sign in")).to_be_visible()

    # When they sign in with a wrong password, they are told so; with the right one, they are in.
    page.goto("/accounts/login/")
    screenshot(page, "account-login")
    page.get_by_label("Email").fill("kay@example.com")
    page.get_by_label("Password").fill("wrong password 123")
    page.locator("main").get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("email address and/or password you specified are not correct")).to_be_visible()
    screenshot(page, "account-login-error")
    page.get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/buyer/$"))
