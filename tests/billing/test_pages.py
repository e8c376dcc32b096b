"""The billing pages with Django's test client against the local Stripe peer: the owner's earnings and payout
setup, the buyer's balance, cards, top-ups, receipts and statements, and the operators' page. Top-ups and
cards go through the real peer; nothing of ours is mocked."""

import csv
import io
import json
import time
import urllib.error
import urllib.request
from datetime import date
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing import payments, payouts, stripe_api
from billing.models import (
    AutoTopUp,
    ConnectedAccount,
    LedgerAccount,
    Payout,
    ReconciliationRun,
    SavedCard,
    SettlementRun,
    StripeEventFailure,
    TopUp,
)
from billing.selectors import account_balance_minor
from billing.services import usage_record
from fleet.models import WorkUnit
from marketplace import corpus, flows
from marketplace.models import BuyerWebhookEvent, User, WebhookDelivery, WebhookEndpoint
from tests.conftest import jsonl
from tests.factories import BuyerFactory, OwnerFactory, VehicleFactory, future

pytestmark = pytest.mark.django_db

EARNINGS = reverse("billing:owner-earnings")
BILLING = reverse("billing:buyer-billing")
OPERATOR = reverse("billing:operator-billing")


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def balance(kind, **party) -> int:
    account = LedgerAccount.objects.filter(kind=kind, **party).first()
    return account_balance_minor(account=account) if account else 0


def run_units(*, organisation, user, cars, units: int, energy_mwh: int = 1500):
    """A job of ``units`` units (8 documents each) completed on ``cars`` in turn at about 7.77 a unit."""
    job = flows.job_create(organisation=organisation, user=user, model_slug="all-minilm-l6-v2", precision="int8",
                              max_price_micros=10**12, deadline=future(), budget_cap_minor=10 * units * 100,
                              inputs=jsonl(corpus.documents(8 * units)).splitlines(keepends=True))
    for i, unit in enumerate(WorkUnit.objects.filter(job=job).order_by("seq")):
        usage_record(unit=unit, vehicle=cars[i % len(cars)], price_micros=777 * 10**13 // unit.mops,
                     energy_mwh=energy_mwh)
    return job


def onboard(stripe_peer, owner) -> ConnectedAccount:
    payouts.onboarding_link_create(owner=owner, refresh_url="http://t/r", return_url="http://t/d")
    account = ConnectedAccount.objects.get(owner=owner)
    return payouts.connected_account_sync(account=account, stripe_account=stripe_peer.onboard(account.stripe_account_id))


def add_card(client, number="4242424242424242"):
    return client.post(reverse("billing:card-add"), {"number": number, "exp": "12/39", "cvc": "123"})


# --- owner ---------------------------------------------------------------------------------------------

def test_the_owner_sees_earnings_per_day_and_per_car_energy_its_cost_at_their_price_and_the_net(stripe_peer, settings):
    # given an owner's two cars that computed six units of one buyer's job (1.5 Wh each)
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS = 7
    buyer = BuyerFactory()
    owner = OwnerFactory()
    cars = [VehicleFactory(owner=owner, name="Blue"), VehicleFactory(owner=owner, name="Red")]
    run_units(organisation=buyer.organisation, user=buyer, cars=cars, units=6)
    client = signed_in(owner)

    # when the owner opens the earnings page without an electricity price
    page = client.get(EARNINGS)
    text = page.content.decode()
    # then the 30 days' earnings (6 x 7.77 less 15 %), energy and the daily chart's data are there
    assert page.status_code == 200
    assert "$39.6" in text and "9.0 Wh" in text
    chart = page.context["chart"]
    assert len(chart) == 30 and chart[-1]["value"] > 0 and all(d["value"] == 0 for d in chart[:-1])
    assert 'data-daily-chart' in text and "Enter your electricity price" in text
    # and one row per car with its own share
    rows = {row["car"].vehicle.name: row for row in page.context["cars"]}
    assert set(rows) == {"Blue", "Red"} and rows["Blue"]["car"].units == 3
    # and the upcoming payout: everything is owed, all of it held back (earned today), not set up at Stripe
    upcoming = page.context["upcoming"]
    assert upcoming.balance_minor == balance("owner", owner=owner) > 3900
    assert upcoming.held_minor == upcoming.balance_minor and not upcoming.will_be_paid
    assert "Set up payouts with Stripe" in text and "No payouts yet" in text

    # when they enter their electricity price (0.30 $/kWh: 9 Wh cost 0.0027)
    page = client.post(EARNINGS, {"price": "0.30"}, follow=True)
    # then the cost and the net appear, and the price is kept with their account
    assert page.context["cost_30d"] == "$0.0027" and page.context["net_30d"].startswith("$39.6")
    owner.refresh_from_db()
    assert owner.electricity_price_micros_per_kwh == 300_000 and client.get(EARNINGS).context["price"] == Decimal("0.3")
    # a nonsense price is a form error on the page, not a crash, and changes nothing
    bad = client.post(EARNINGS, {"price": "-1"})
    assert bad.status_code == 200 and bad.context["price_form"].errors
    owner.refresh_from_db()
    assert owner.electricity_price_micros_per_kwh == 300_000
    # and it can be cleared
    client.post(EARNINGS, {"clear": "1"})
    owner.refresh_from_db()
    assert owner.electricity_price_micros_per_kwh is None


def test_an_owner_without_earnings_sees_empty_states():
    page = signed_in(OwnerFactory()).get(EARNINGS)
    text = page.content.decode()
    assert page.status_code == 200
    assert "No earnings in the last 30 days yet" in text and "No cars yet" in text and "No payouts yet" in text


def test_the_owner_sets_up_payouts_on_the_local_peer_and_comes_back_synced(stripe_peer):
    owner = OwnerFactory()
    client = signed_in(owner)
    # when the owner presses the call to action
    answer = client.post(reverse("billing:owner-onboarding"))
    # then an Express account exists and the browser is sent to the (local) onboarding link
    account = ConnectedAccount.objects.get(owner=owner)
    assert answer.status_code == 302 and answer["Location"].startswith(stripe_peer.url)
    assert not account.can_receive_transfers
    # when the browser opens it, the peer completes onboarding and sends it back to our return URL

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    with pytest.raises(urllib.error.HTTPError) as back:
        urllib.request.build_opener(NoRedirect).open(answer["Location"], timeout=10)
    location = back.value.headers["Location"]
    assert location.endswith(reverse("billing:owner-onboarding-return"))
    # and the return page reads the account from Stripe
    page = client.get(reverse("billing:owner-onboarding-return"), follow=True)
    account.refresh_from_db()
    assert account.can_receive_transfers
    assert "Stripe payouts are set up" in page.content.decode() and "Ready" in page.content.decode()


def test_a_settled_owner_sees_the_payout_and_what_the_next_settlement_would_pay(stripe_peer, settings):
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS, settings.STRIPE_MIN_PAYOUT_MINOR = 0, 100
    buyer, car = BuyerFactory(), VehicleFactory()
    onboard(stripe_peer, car.owner)
    run_units(organisation=buyer.organisation, user=buyer, cars=[car], units=3)
    run = payouts.settlement_run()
    page = signed_in(car.owner).get(EARNINGS)
    payout = page.context["payouts"][0]
    assert payout.status == "sent" and payout.run == run
    text = page.content.decode()
    assert run.key in text and payout.transfer_id in text and "Sent" in text
    # nothing is owed after the payout; the next settlement is next week's
    assert page.context["upcoming"].balance_minor == 0 and page.context["next_at"].weekday() == 0


def test_earnings_pages_are_for_owners_only():
    assert Client().get(EARNINGS).status_code == 302  # sign in first
    assert signed_in(BuyerFactory()).get(EARNINGS).status_code == 403
    assert signed_in(BuyerFactory()).post(reverse("billing:owner-onboarding")).status_code == 403


# --- buyer ---------------------------------------------------------------------------------------------

def test_a_buyer_saves_a_test_card_tops_up_and_sees_the_balance_and_a_receipt(stripe_peer):
    buyer = BuyerFactory(organisation__credit=0)
    org = buyer.organisation
    client = signed_in(buyer)
    page = client.get(BILLING)
    assert page.status_code == 200 and "No card saved yet" in page.content.decode()

    # when the buyer saves the test card 4242 4242 4242 4242 (through the peer's SetupIntent)
    answer = add_card(client, "4242 4242 4242 4242")
    assert answer.status_code == 302
    card = SavedCard.objects.get(organisation=org)
    assert (card.last4, card.exp_month, card.exp_year) == ("4242", 12, 2039)

    # and tops up 25.00 with it
    answer = client.post(reverse("billing:top-up"), {"amount": "25.00", "card": card.pk}, follow=True)
    # then the card was charged once at the peer and the balance shows it
    top_up = TopUp.objects.get(organisation=org)
    assert top_up.status == TopUp.Status.SUCCEEDED and top_up.created_by == buyer
    assert [c["amount"] for c in stripe_peer.objects("charges")] == [2500]
    text = answer.content.decode()
    assert "$25.00 added to your balance" in text
    assert answer.context["summary"].balance_minor == 2500 == balance("buyer", organisation=org)

    # and the receipt is a printable page of that top-up
    receipt = client.get(reverse("billing:receipt", args=[top_up.pk]))
    assert receipt.status_code == 200
    assert "Receipt" in receipt.content.decode() and "$25.00" in receipt.content.decode()
    assert top_up.payment_intent_id in receipt.content.decode()


def test_a_declined_card_is_shown_as_a_clear_message_and_nothing_is_booked(stripe_peer):
    buyer = BuyerFactory(organisation__credit=0)
    client = signed_in(buyer)
    add_card(client, "4000000000000341")  # saves, then every charge is declined
    card = SavedCard.objects.get(organisation=buyer.organisation)
    page = client.post(reverse("billing:top-up"), {"amount": "40", "card": card.pk})
    assert page.status_code == 200
    text = page.content.decode()
    assert "Your card was declined" in text and "Nothing was charged" in text
    assert TopUp.objects.get().status == TopUp.Status.FAILED
    assert balance("buyer", organisation=buyer.organisation) == 0
    # the failed top-up is listed, with no receipt
    assert client.get(reverse("billing:receipt", args=[TopUp.objects.get().pk])).status_code == 404


def test_a_card_refused_when_saved_and_bad_form_input_show_errors_on_the_page(stripe_peer):
    buyer = BuyerFactory(organisation__credit=0)
    client = signed_in(buyer)
    refused = add_card(client, "4000000000000002")
    assert refused.status_code == 200 and "The card was not saved" in refused.content.decode()
    assert not SavedCard.objects.exists()
    wrong = client.post(reverse("billing:card-add"), {"number": "4242424242424241", "exp": "13/30", "cvc": "x"})
    assert set(wrong.context["card_form"].errors) == {"number", "exp", "cvc"}
    add_card(client)
    card = SavedCard.objects.get()
    too_small = client.post(reverse("billing:top-up"), {"amount": "0.50", "card": card.pk})
    assert too_small.status_code == 200 and "amount" in too_small.context["top_up_form"].errors
    assert not TopUp.objects.exists()


def test_auto_top_up_settings_are_saved_for_the_organisations_own_card(stripe_peer):
    buyer = BuyerFactory(organisation__credit=0)
    client = signed_in(buyer)
    add_card(client)
    card = SavedCard.objects.get()
    page = client.post(reverse("billing:auto-top-up"),
                       {"enabled": "on", "threshold": "20.00", "amount": "100.00", "card": card.pk}, follow=True)
    rule = AutoTopUp.objects.get(organisation=buyer.organisation)
    assert (rule.threshold_minor, rule.amount_minor, rule.enabled, rule.card) == (2000, 10000, True, card)
    assert "Automatic top-up on: $100.00 whenever the balance falls under $20.00" in page.content.decode()
    client.post(reverse("billing:auto-top-up"), {"threshold": "20.00", "amount": "100.00", "card": card.pk})
    rule.refresh_from_db()
    assert rule.enabled is False


def test_a_buyer_never_sees_or_uses_another_organisations_billing(stripe_peer):
    # given two organisations that each topped up with their own card
    ours, theirs = BuyerFactory(organisation__credit=0), BuyerFactory(organisation__credit=0)
    our_client, their_client = signed_in(ours), signed_in(theirs)
    for client in (our_client, their_client):
        add_card(client)
    their_card = SavedCard.objects.get(organisation=theirs.organisation)
    their_client.post(reverse("billing:top-up"), {"amount": "77.00", "card": their_card.pk})
    their_top_up = TopUp.objects.get(organisation=theirs.organisation)
    # then our page shows none of theirs
    page = our_client.get(BILLING)
    assert page.context["summary"].balance_minor == 0 and "$77.00" not in page.content.decode()
    assert [c.organisation for c in page.context["summary"].cards] == [ours.organisation]
    # their receipt is a 404 to us, their card cannot pay our top-up, and our statement has none of their entries
    assert our_client.get(reverse("billing:receipt", args=[their_top_up.pk])).status_code == 404
    refused = our_client.post(reverse("billing:top-up"), {"amount": "5.00", "card": their_card.pk})
    assert "card" in refused.context["top_up_form"].errors and TopUp.objects.count() == 1
    today = timezone.now().date()
    statement = our_client.get(reverse("billing:statement", args=[today.year, f"{today.month:02d}"])).content.decode()
    assert "Top-up" not in statement
    # and owners or anonymous visitors do not get buyer pages at all
    assert signed_in(OwnerFactory()).get(BILLING).status_code == 403
    assert Client().get(BILLING).status_code == 302


def test_the_monthly_statement_lists_every_entry_with_running_balances(stripe_peer):
    buyer = BuyerFactory(organisation__credit=0)
    org = buyer.organisation
    payments.top_up_create(organisation=org, amount_minor=10_000, payment_method_id="pm_card_visa")
    job = run_units(organisation=org, user=buyer, cars=[VehicleFactory()], units=2)
    today = timezone.now().date()
    answer = signed_in(buyer).get(reverse("billing:statement", args=[today.year, f"{today.month:02d}"]))
    assert answer.status_code == 200 and answer["Content-Type"].startswith("text/csv")
    assert f"statement-{org.slug}-{today.year}-{today.month:02d}.csv" in answer["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.content.decode())))
    assert rows[0]["kind"] == "opening" and rows[0]["total"] == "0.00"
    assert rows[-1]["kind"] == "closing"
    entries = rows[1:-1]
    assert entries[0]["kind"] == "top_up" and entries[0]["amount"] == "100.00" and entries[0]["balance"] == "100.00"
    assert {"reservation", "usage"} <= {e["kind"] for e in entries}
    assert any(e["job"] == str(job.pk) for e in entries)
    # the running total after each entry is the sum of the amounts so far; the closing line agrees with the ledger
    running = Decimal("0")
    for entry in entries:
        running += Decimal(entry["amount"])
        assert Decimal(entry["total"]) == running
    closing = balance("buyer", organisation=org) + balance("buyer_reserved", organisation=org)
    assert Decimal(rows[-1]["total"]) == Decimal(closing) / 100
    assert Decimal(rows[-1]["balance"]) == Decimal(balance("buyer", organisation=org)) / 100
    # next month's statement opens where this one closed and has no entries
    following = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    nxt = list(csv.DictReader(io.StringIO(signed_in(buyer).get(
        reverse("billing:statement", args=[following.year, f"{following.month:02d}"])).content.decode())))
    assert [r["kind"] for r in nxt] == ["opening", "closing"] and nxt[0]["total"] == rows[-1]["total"]
    assert signed_in(buyer).get(f"/billing/account/statements/{today.year}-13.csv").status_code == 404
    # and the page links this month's statement and shows what the buyer spent per job and per day
    page = signed_in(buyer).get(BILLING)
    assert f'href="/billing/account/statements/{today.year}-{today.month:02d}.csv"' in page.content.decode()
    assert page.context["spend_jobs"][0]["job"] == job and page.context["spend_jobs"][0]["units"] == 2
    assert page.context["spend_30d"] == page.context["spend_jobs"][0]["charged_minor"] > 0
    assert page.context["summary"].reserved_minor == balance("buyer_reserved", organisation=org)


# --- operator ------------------------------------------------------------------------------------------

def staff_user() -> User:
    return User.objects.create_user("ops@example.com", "pw-for-tests-1", role=User.Role.OPERATOR, is_staff=True)


def test_operator_pages_are_for_staff_only():
    for user in (BuyerFactory(), OwnerFactory(), User.objects.create_user("op@example.com", "pw", role=User.Role.OPERATOR)):
        client = signed_in(user)
        assert client.get(OPERATOR).status_code == 403
        assert client.post(reverse("billing:operator-reconcile")).status_code == 403
    assert Client().get(OPERATOR).status_code == 302
    assert not ReconciliationRun.objects.exists()


def test_an_empty_operator_page_says_so():
    text = signed_in(staff_user()).get(OPERATOR).content.decode()
    for empty in ("No platform revenue in the last 30 days", "No owner is owed anything", "No failed payouts",
                  "No failed Stripe events", "No failed deliveries", "No reconciliation has run yet"):
        assert empty in text


def test_the_operator_sees_revenue_payables_failures_and_runs_the_reconciliation(stripe_peer, settings):
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS, settings.STRIPE_MIN_PAYOUT_MINOR = 0, 100
    # given a job computed on two owners' cars, one of whom has set up Stripe payouts
    buyer = BuyerFactory(organisation__credit=0)
    payments.top_up_create(organisation=buyer.organisation, amount_minor=10_000, payment_method_id="pm_card_visa")
    ready, pending = VehicleFactory(), VehicleFactory()
    onboard(stripe_peer, ready.owner)
    run_units(organisation=buyer.organisation, user=buyer, cars=[ready, pending], units=4)
    # and a buyer webhook delivery that gave up
    endpoint = WebhookEndpoint.objects.create(organisation=buyer.organisation, url="https://buyer.example/hook",
                                              secret="whsec_x")
    event = BuyerWebhookEvent.objects.create(public_id="evt_gaveup", organisation=buyer.organisation, type="job.completed",
                                        body="{}", created_at=timezone.now())
    WebhookDelivery.objects.create(event=event, endpoint=endpoint, state=WebhookDelivery.State.FAILED, attempts=8,
                                   last_status_code=500, last_error="server error", last_attempt_at=timezone.now())
    client = signed_in(staff_user())

    page = client.get(OPERATOR)
    text = page.content.decode()
    # then the platform's fee per day, each owner's payable and what the next settlement would pay
    assert page.context["revenue_30d"] == balance("platform_fee") > 0
    assert page.context["chart"][-1]["value"] == page.context["revenue_30d"]
    payables = {p.owner: p for p in page.context["payables"]}
    assert payables[ready.owner].will_be_paid and not payables[pending.owner].will_be_paid
    assert payables[pending.owner].reason == "Not paid until Stripe payouts are set up."
    assert page.context["paid_next"] == payables[ready.owner].payable_minor
    assert "evt_gaveup" in text and "HTTP 500" in text

    # when the operator runs the reconciliation
    answer = client.post(reverse("billing:operator-reconcile"), follow=True)
    # then the run is stored with who ran it and no difference, and shown
    run = ReconciliationRun.objects.get()
    assert run.triggered_by.email == "ops@example.com" and run.differences == [] and not run.error and run.finished_at
    assert "no difference between the ledger and Stripe" in answer.content.decode()


def test_a_failed_payout_and_a_reconciliation_difference_are_listed(stripe_peer, settings):
    settings.STRIPE_PAYOUT_HOLDBACK_DAYS, settings.STRIPE_MIN_PAYOUT_MINOR = 0, 100
    buyer, car = BuyerFactory(), VehicleFactory()
    onboard(stripe_peer, car.owner)
    run_units(organisation=buyer.organisation, user=buyer, cars=[car], units=2)
    run = payouts.settlement_run()
    # a transfer made behind our back in the run's group is a difference
    destination = car.owner.connected_account.stripe_account_id
    stripe_peer.post("/v1/transfers", {"amount": 5, "currency": "usd", "destination": destination,
                                       "transfer_group": run.transfer_group})
    payout = run.payouts.get()
    failed = payouts.payout_failed(payout=Payout.objects.create(
        run=SettlementRun.objects.create(key="2000-W01", currency="usd", transfer_group="settlement-2000-W01",
                                                 holdback_days=0, min_payout_minor=100),
        owner=car.owner, account=payout.account, amount_minor=100, currency="usd"),
        message="The destination account cannot receive transfers.")
    client = signed_in(staff_user())
    client.post(reverse("billing:operator-reconcile"))
    page = client.get(OPERATOR)
    text = page.content.decode()
    assert failed.status == "failed" and "cannot receive transfers" in text
    latest = page.context["latest_run"]
    assert any(d["what"].startswith("transfer tr_") for d in latest.differences)
    assert "difference" in text and run.transfer_group in text


def test_the_command_stores_each_run_and_an_unreachable_stripe_is_stored_as_the_runs_error(stripe_peer):
    out = io.StringIO()
    call_command("billing_reconcile", stdout=out)
    assert "No differences" in out.getvalue()
    first = ReconciliationRun.objects.get()
    assert first.differences == [] and first.triggered_by is None and first.finished_at
    # given a top-up to check and Stripe's answer lost, the run cannot finish: stored with its error, exit 1
    payments.top_up_create(organisation=BuyerFactory().organisation, amount_minor=1000, payment_method_id="pm_card_visa")
    stripe_peer.network.lose_next("GET", "/v1/payment_intents/")
    with pytest.raises(CommandError, match="could not finish"):
        call_command("billing_reconcile", stdout=io.StringIO())
    latest = ReconciliationRun.objects.first()
    assert latest.pk != first.pk and "StripeUnavailable" in latest.error


def test_a_stripe_event_answered_503_is_recorded_for_operators_and_shown_repaired_after_redelivery(stripe_peer, settings):
    # given a top-up whose confirmation answer was lost (still "created": the webhook will credit it)
    org = BuyerFactory(organisation__credit=0).organisation
    stripe_peer.network.lose_next("POST", "/confirm")
    with pytest.raises(stripe_api.StripeUnavailable):
        payments.top_up_create(organisation=org, amount_minor=1500, payment_method_id="pm_card_visa")
    top_up = TopUp.objects.get()
    intent = stripe_peer.get(f"/v1/payment_intents/{top_up.payment_intent_id}")
    body = json.dumps({"id": "evt_page_1", "type": "payment_intent.succeeded", "data": {"object": intent}}).encode()

    def deliver():
        signature = stripe_api.webhook_sign(payload=body, secret=settings.STRIPE_WEBHOOK_SECRET, timestamp=int(time.time()))
        return Client().post(reverse("billing:stripe-webhook"), body, content_type="application/json",
                             HTTP_STRIPE_SIGNATURE=signature)

    # when the handler's read from Stripe fails, the answer is 503 and the failure is recorded
    stripe_peer.network.lose_next("GET", "/v1/charges/")
    assert deliver().status_code == 503
    failure = StripeEventFailure.objects.get()
    assert (failure.event_id, failure.type) == ("evt_page_1", "payment_intent.succeeded")
    assert "StripeUnavailable" in failure.error
    page = signed_in(staff_user()).get(OPERATOR)
    assert page.context["event_failures"][0]["repaired"] is False
    # and after Stripe delivers it again successfully, the operator sees it processed
    assert deliver().status_code == 200
    assert TopUp.objects.get().status == TopUp.Status.SUCCEEDED
    page = signed_in(User.objects.get(email="ops@example.com")).get(OPERATOR)
    assert page.context["event_failures"][0]["repaired"] is True and "processed since" in page.content.decode()
