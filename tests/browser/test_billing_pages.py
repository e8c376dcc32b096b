"""The billing pages in headless Chromium against the real product server and its own local Stripe peer: a
buyer saves a test card, tops up and sees the balance change (and a decline explained); an owner reads their
earnings chart and sets up Stripe payouts through the peer's onboarding link; an operator runs the
reconciliation. Screenshots go to test-output/screenshots/ and /tmp/shots/."""

import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect

from billing.models import ConnectedAccount, ReconciliationRun, SavedCard, TopUp
from billing.services import usage_record
from fleet.models import WorkUnit
from marketplace import corpus, flows
from marketplace.models import User
from tests.conftest import jsonl
from tests.factories import BuyerFactory, OwnerFactory, VehicleFactory, future

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "pw-for-tests-1"
SHOTS = Path("/tmp/shots")


@pytest.fixture
def shot(screenshot):
    """The suite's screenshot, copied to /tmp/shots/ as well."""
    SHOTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        path = screenshot(page, name)
        shutil.copy(path, SHOTS / path.name)
        return path

    return take


def sign_in(page, email: str) -> None:
    page.goto("/accounts/login/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()


def test_a_buyer_saves_a_test_card_tops_up_and_sees_the_balance_change(page, shot):
    # Given a buyer whose organisation has no money yet,
    buyer = BuyerFactory(password=PASSWORD, organisation__credit=0)
    sign_in(page, buyer.email)
    # when they open Billing from the navigation,
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Billing").click()
    expect(page).to_have_url(re.compile(r"/billing/account/$"))
    expect(page.get_by_test_id("balance")).to_have_text("$0.00")
    expect(page.get_by_test_id("no-cards")).to_be_visible()
    shot(page, "billing-buyer-empty")

    # and save the test card 4242 4242 4242 4242,
    card_form = page.get_by_test_id("card-form")
    card_form.get_by_label("Card number").fill("4242 4242 4242 4242")
    card_form.get_by_label("Expiry (MM/YY)").fill("12/34")
    card_form.get_by_label("CVC").fill("123")
    card_form.get_by_role("button", name="Save card").click()
    expect(page.get_by_text("Visa ending 4242 saved.")).to_be_visible()
    expect(page.get_by_test_id("cards")).to_contain_text("4242")

    # and top up 25.00 with it,
    top_up = page.get_by_test_id("top-up-form")
    top_up.get_by_label("Amount (USD)").fill("25.00")
    top_up.get_by_role("button", name="Pay and top up").click()

    # then the balance shows it, and the top-up is listed with its receipt.
    expect(page.get_by_text("$25.00 added to your balance")).to_be_visible()
    expect(page.get_by_test_id("balance")).to_have_text("$25.00")
    expect(page.get_by_test_id("top-ups")).to_contain_text("Paid")
    assert TopUp.objects.get(organisation=buyer.organisation).status == TopUp.Status.SUCCEEDED
    shot(page, "billing-buyer-topped-up")
    page.get_by_role("link", name="Receipt").click()
    expect(page.get_by_test_id("receipt")).to_contain_text("$25.00")
    expect(page.get_by_test_id("receipt")).to_contain_text(buyer.organisation.name)
    shot(page, "billing-buyer-receipt")
    page.go_back()

    # When they save a card that the bank declines when charged and top up with it,
    card_form = page.get_by_test_id("card-form")
    card_form.get_by_label("Card number").fill("4000 0000 0000 0341")
    card_form.get_by_label("Expiry (MM/YY)").fill("11/33")
    card_form.get_by_label("CVC").fill("321")
    card_form.get_by_role("button", name="Save card").click()
    expect(page.get_by_test_id("cards")).to_contain_text("0341")
    card = SavedCard.objects.get(organisation=buyer.organisation, last4="0341")
    top_up = page.get_by_test_id("top-up-form")
    top_up.get_by_label("Amount (USD)").fill("40")
    top_up.get_by_label("Card").select_option(str(card.pk))
    top_up.get_by_role("button", name="Pay and top up").click()
    # then the decline is said plainly next to the form, and the balance is unchanged.
    expect(page.get_by_test_id("top-up-errors")).to_contain_text("Your card was declined")
    expect(page.get_by_test_id("balance")).to_have_text("$25.00")
    shot(page, "billing-buyer-declined")

    # When a job reserves 20.00 of it and two of its units are completed (about 7.77 each),
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                              precision="int8", max_price_micros=10**12, deadline=future(), budget_cap_minor=2000,
                              inputs=jsonl(corpus.documents(16)).splitlines(keepends=True))
    car = VehicleFactory()
    for unit in WorkUnit.objects.filter(job=job).order_by("seq"):
        usage_record(unit=unit, vehicle=car, price_micros=777 * 10**13 // unit.mops, energy_mwh=1500)
    page.goto("/billing/account/")
    # then the page shows what is left, what is reserved, and the spend per day and per job.
    expect(page.get_by_test_id("balance")).to_have_text("$5.00")
    expect(page.get_by_test_id("reserved")).to_have_text("$4.46")
    expect(page.get_by_test_id("spent-30d")).to_have_text("$15.54")
    expect(page.locator("[data-testid=spend-data-chart] svg rect")).to_have_count(30)
    expect(page.get_by_test_id("spend-jobs")).to_contain_text(f"#{job.pk}")
    shot(page, "billing-buyer-spend")
    page.set_viewport_size({"width": 390, "height": 844})  # and it reads on a phone
    shot(page, "billing-buyer-phone")


def test_an_owner_reads_their_earnings_and_sets_up_stripe_payouts(page, shot):
    # Given an owner whose two cars computed six units of a buyer's job,
    owner = OwnerFactory(password=PASSWORD)
    cars = [VehicleFactory(owner=owner, name="Model 3 garage"), VehicleFactory(owner=owner, name="Model Y street")]
    buyer = BuyerFactory()
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                              precision="int8", max_price_micros=10**12, deadline=future(), budget_cap_minor=10_000,
                              inputs=jsonl(corpus.documents(48)).splitlines(keepends=True))
    for i, unit in enumerate(WorkUnit.objects.filter(job=job).order_by("seq")):
        usage_record(unit=unit, vehicle=cars[i % 2], price_micros=777 * 10**13 // unit.mops, energy_mwh=1500 + 300 * i)

    # when they open Earnings and enter their electricity price,
    sign_in(page, owner.email)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Earnings").click()
    expect(page).to_have_url(re.compile(r"/billing/earnings/$"))
    expect(page.get_by_test_id("earned-30d")).to_contain_text("$39.6")
    # (the chart is drawn by the page's script: one bar per day of the last 30)
    expect(page.locator("[data-testid=earnings-data-chart] svg rect")).to_have_count(30)
    page.get_by_label("Your electricity price (USD per kWh)").fill("0.30")
    page.get_by_role("button", name="Estimate cost").click()
    expect(page.get_by_test_id("net-30d")).to_contain_text("$39.6")
    expect(page.get_by_test_id("cars-earnings")).to_contain_text("Model Y street")
    expect(page.get_by_test_id("payouts-empty")).to_be_visible()
    shot(page, "billing-owner-earnings")

    # and press the call to action to be paid,
    page.get_by_test_id("onboarding").click()
    # then the (local) Stripe onboarding brings them back with payouts set up.
    expect(page).to_have_url(re.compile(r"/billing/earnings/$"))
    expect(page.locator(".msg.success")).to_contain_text("Stripe payouts are set up")
    expect(page.get_by_test_id("connect")).to_contain_text("Ready")
    assert ConnectedAccount.objects.get(owner=owner).can_receive_transfers
    shot(page, "billing-owner-onboarded")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "billing-owner-phone")


def test_an_operator_runs_the_reconciliation_from_the_billing_operations_page(page, shot):
    # Given a job computed on two owners' cars (their payables and the platform's fee) and a staff member,
    buyer = BuyerFactory()
    cars = [VehicleFactory(), VehicleFactory()]
    job = flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                              precision="int8", max_price_micros=10**12, deadline=future(), budget_cap_minor=10_000,
                              inputs=jsonl(corpus.documents(32)).splitlines(keepends=True))
    for i, unit in enumerate(WorkUnit.objects.filter(job=job).order_by("seq")):
        usage_record(unit=unit, vehicle=cars[i % 2], price_micros=777 * 10**13 // unit.mops, energy_mwh=1500)
    User.objects.create_user("ops@example.com", PASSWORD, role=User.Role.OPERATOR, is_staff=True)
    sign_in(page, "ops@example.com")
    page.goto("/market/")  # (operators land in the admin; the site's pages carry the link)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Billing ops").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Billing operations")
    expect(page.get_by_test_id("payables")).to_contain_text(cars[1].owner.email)
    expect(page.locator("[data-testid=revenue-data-chart] svg rect")).to_have_count(30)
    page.get_by_test_id("reconcile").click()
    expect(page.get_by_test_id("latest-run")).to_contain_text("no difference")
    assert ReconciliationRun.objects.get().triggered_by.email == "ops@example.com"
    shot(page, "billing-operator")
