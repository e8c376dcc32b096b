"""Billing's HTML pages and Stripe's webhook endpoint.

- Owner: earnings (per day and per car, energy and its cost, net), upcoming and past payouts, Stripe Connect
  onboarding. Car owners only (anonymous: sign-in redirect; other accounts: 403).
- Buyer: balance and reservations, top-ups, saved cards, automatic top-up, spend per job and per day,
  receipts and monthly statements. Members of a buyer organisation only; every row is looked up within the
  member's own organisation (another organisation's receipt: 404).
- Operator: platform revenue, payables due, failures, reconciliation. Staff (``is_staff``) only: 403.

Views read through billing.reports and billing.selectors and change things only through billing.payments,
billing.payouts, billing.reconcile, billing.stripe_webhooks and billing.services."""

import csv
import logging
from datetime import date
from decimal import Decimal

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from billing import payments, payouts, reports, selectors, stripe_api, stripe_webhooks
from billing.errors import BillingError
from billing.forms import AutoTopUpForm, CardDetailsForm, ElectricityPriceForm, TopUpForm
from billing.models import ConnectedAccount, TopUp
from billing.money import MICROS_PER_MAJOR, currency_symbol, format_major, format_minor, minor_to_major
from billing.reconcile import reconciliation_run
from billing.services import AlreadyClaimed, owner_electricity_price_set
from marketplace.selectors import organisation_of

log = logging.getLogger(__name__)



# --- Stripe's webhook ----------------------------------------------------------------------------------

@csrf_exempt
@require_POST
def stripe_webhook(request):
    """Stripe's event deliveries: 400 for a bad signature or a stale/future timestamp, 200 once an event is
    processed or ignored (also when delivered again), 503 when it could not be processed now (Stripe
    delivers it again later). A 503 is recorded as a ``StripeEventFailure`` for the operators, after the
    failed transaction rolled back."""
    try:
        event = stripe_api.webhook_verify(payload=request.body,
                                          signature_header=request.headers.get("Stripe-Signature"))
    except stripe_api.WebhookSignatureInvalid as error:
        return JsonResponse({"error": {"code": error.code, "message": error.message}}, status=400)
    try:
        record = stripe_webhooks.event_process(event=event)
    except (stripe_api.StripeUnavailable, DatabaseError) as error:
        log.warning("stripe event %s could not be processed now", event["id"], exc_info=True)
        stripe_webhooks.event_failure_record(event=event, error=error)
        return JsonResponse({"error": {"code": "try_again"}}, status=503)
    return JsonResponse({"id": record.event_id, "status": record.status, "outcome": record.outcome})


# --- owner ---------------------------------------------------------------------------------------------

def _require_owner(request) -> None:
    if not request.user.is_owner:
        raise PermissionDenied("Earnings pages are for car owners.")


def _electricity_price(owner) -> Decimal | None:
    micros = owner.electricity_price_micros_per_kwh
    return None if micros is None else Decimal(micros) / MICROS_PER_MAJOR


@login_required
def owner_earnings(request):
    _require_owner(request)
    now, currency, owner = timezone.now(), settings.CURRENCY, request.user
    price = _electricity_price(owner)
    if request.method == "POST":  # the owner's electricity price, kept on their account
        price_form = ElectricityPriceForm(request.POST)
        if "clear" in request.POST or price_form.is_valid():
            new = None if "clear" in request.POST else price_form.cleaned_data["price"]
            owner_electricity_price_set(owner=owner, micros_per_kwh=None if new is None else int(new * MICROS_PER_MAJOR))
            messages.success(request, "Electricity price cleared." if new is None else
                             f"Electricity price set to {new} {currency_symbol(currency)}/kWh: the costs below use it.")
            return redirect("billing:owner-earnings")
    else:
        price_form = ElectricityPriceForm(initial={"price": price})
    daily = reports.owner_daily(owner=owner, now=now, currency=currency)
    chart = reports.owner_earnings_chart(daily, currency)
    earned_30d = sum(d["earned_femto"] for d in daily)
    energy_30d = sum(d["energy_mwh"] for d in daily)
    cost_30d = reports.energy_cost(energy_mwh=energy_30d, price_per_kwh=price)
    net_30d = selectors.owner_net_earnings(earned_femto=earned_30d, energy_cost=cost_30d)
    cars = []
    for car in reports.owner_cars(owner=owner, now=now, currency=currency):
        cost = reports.energy_cost(energy_mwh=car.energy_mwh, price_per_kwh=price)
        net = selectors.owner_net_earnings(earned_femto=car.earned_femto, energy_cost=cost)
        cars.append({"car": car, "earned": reports.femto_money(car.earned_femto, currency),
                     "earned_30d": reports.femto_money(car.earned_30d_femto, currency),
                     "energy": reports.energy_text(car.energy_mwh), "energy_30d": reports.energy_text(car.energy_30d_mwh),
                     "cost": None if cost is None else format_major(cost, currency, places=4),
                     "net": None if net is None else format_major(net, currency, places=4)})
    upcoming, next_at = reports.owner_upcoming(owner=owner, now=now, currency=currency)
    return render(request, "billing/owner_earnings.html", {
        "currency": currency, "chart": [p.as_json() for p in chart], "chart_days": chart, "has_earnings": earned_30d > 0,
        "timezone": reports.owner_timezone(owner=owner).key,
        "earned_30d": reports.femto_money(earned_30d, currency), "energy_30d": reports.energy_text(energy_30d),
        "units_30d": sum(d["units"] for d in daily),
        "cost_30d": None if cost_30d is None else format_major(cost_30d, currency, places=4),
        "net_30d": None if net_30d is None else format_major(net_30d, currency, places=4),
        "price": price, "price_unit": f"{currency_symbol(currency)}/kWh", "price_form": price_form, "cars": cars,
        "upcoming": upcoming, "next_at": next_at, "holdback_days": settings.STRIPE_PAYOUT_HOLDBACK_DAYS,
        "payouts": reports.owner_payouts(owner=owner),
        "connected": ConnectedAccount.objects.filter(owner=owner).first(),
        "local_peer": settings.STRIPE_IS_LOCAL_PEER,
    })


def _onboarding_redirect(request):
    try:
        url = payouts.onboarding_link_create(
            owner=request.user,
            refresh_url=request.build_absolute_uri(reverse("billing:owner-onboarding-refresh")),
            return_url=request.build_absolute_uri(reverse("billing:owner-onboarding-return")))
    except BillingError as error:
        log.warning("onboarding link for owner %s failed", request.user.pk, exc_info=True)
        messages.error(request, f"Stripe could not start the payout setup just now ({error.message}). "
                                "Try again in a minute.")
        return redirect("billing:owner-earnings")
    return redirect(url)


@login_required
@require_POST
def owner_onboarding(request):
    """The call to action: create the owner's Express account (first time) and send them to Stripe's
    onboarding (on the local peer, the peer's own page, which completes at once and comes back)."""
    _require_owner(request)
    return _onboarding_redirect(request)


@login_required
@require_GET
def owner_onboarding_refresh(request):
    """Stripe sends the owner here when an onboarding link expired or was used: a fresh link."""
    _require_owner(request)
    return _onboarding_redirect(request)


@login_required
@require_GET
def owner_onboarding_return(request):
    """Back from Stripe's onboarding: read the account's state from Stripe (the ``account.updated`` webhook
    does the same; whichever is first)."""
    _require_owner(request)
    account = ConnectedAccount.objects.filter(owner=request.user).first()
    if account is None:
        return redirect("billing:owner-earnings")
    try:
        account = payouts.connected_account_sync(account=account)
    except BillingError as error:
        messages.warning(request, f"Stripe did not answer ({error.message}); your payout status updates shortly.")
        return redirect("billing:owner-earnings")
    if account.can_receive_transfers:
        messages.success(request, "Stripe payouts are set up: your earnings are paid at the weekly settlement.")
    else:
        messages.warning(request, "Stripe still needs some details before it can pay you. Continue the setup below.")
    return redirect("billing:owner-earnings")


# --- buyer ---------------------------------------------------------------------------------------------

def _organisation(request):
    organisation = organisation_of(request)
    if organisation is None:
        raise PermissionDenied("Billing pages are for members of a buyer organisation.")
    return organisation


def _buyer_page(request, organisation, **forms):
    now, currency = timezone.now(), settings.CURRENCY
    summary = reports.buyer_summary(organisation=organisation, currency=currency)
    rule = summary.auto_top_up
    chart = reports.buyer_spend_chart(organisation=organisation, currency=currency, now=now)
    context = {
        "organisation": organisation, "summary": summary, "currency": currency,
        "top_up_form": forms.get("top_up_form") or TopUpForm(organisation=organisation),
        "card_form": forms.get("card_form") or CardDetailsForm(),
        "auto_form": forms.get("auto_form") or AutoTopUpForm(organisation=organisation, initial={
            "enabled": rule.enabled if rule else True,
            "threshold": minor_to_major(rule.threshold_minor, currency) if rule else Decimal("10.00"),
            "amount": minor_to_major(rule.amount_minor, currency) if rule else Decimal("50.00"),
            "card": rule.card_id if rule else None}),
        "local_peer": settings.STRIPE_IS_LOCAL_PEER,
        "spend_jobs": reports.buyer_spend_per_job(organisation=organisation, currency=currency),
        "chart": [p.as_json() for p in chart], "chart_days": chart,
        "spend_30d": sum(int(p.value) for p in chart),
        "months": reports.statement_months(organisation=organisation, today=now.date()),
    }
    return render(request, "billing/buyer_billing.html", context)


@login_required
def buyer_billing(request):
    return _buyer_page(request, _organisation(request))


@login_required
@require_POST
def top_up(request):
    organisation = _organisation(request)
    form = TopUpForm(request.POST, organisation=organisation)
    if not form.is_valid():
        return _buyer_page(request, organisation, top_up_form=form)
    card = form.cleaned_data["card"]
    try:
        result = payments.top_up_create(organisation=organisation, amount_minor=form.amount_minor,
                                        payment_method_id=card.stripe_payment_method_id, user=request.user)
    except (stripe_api.StripeUnavailable, AlreadyClaimed):
        messages.warning(request, "Stripe did not answer in time. The top-up is finished automatically within a few "
                                  "minutes, and your card is never charged twice: check back shortly.")
        return redirect("billing:buyer-billing")
    except BillingError as error:
        form.add_error(None, error.message)
        return _buyer_page(request, organisation, top_up_form=form)
    amount = format_minor(result.amount_minor, result.currency)
    if result.status == TopUp.Status.SUCCEEDED:
        messages.success(request, f"{amount} added to your balance (top-up #{result.pk}; the receipt is in the list below).")
    elif result.status == TopUp.Status.FAILED:
        reason = (result.failure_message or "").strip().rstrip(".")
        said = reason if "declined" in reason.lower() else f"Your card was declined{': ' + reason if reason else ''}"
        form.add_error(None, f"{said}. Nothing was charged; try another card.")
        return _buyer_page(request, organisation, top_up_form=form)
    else:
        messages.warning(request, f"Your bank asks you to confirm the payment of {amount}. The balance is credited "
                                  "as soon as Stripe reports it confirmed.")
    return redirect("billing:buyer-billing")


@login_required
@require_POST
def card_add(request):
    """Save a test card on the local Stripe peer (payments.card_add_test_card); elsewhere cards are saved with
    Stripe's own form."""
    organisation = _organisation(request)
    if not settings.STRIPE_IS_LOCAL_PEER:
        raise Http404("Cards are added with Stripe's form.")
    form = CardDetailsForm(request.POST)
    if not form.is_valid():
        return _buyer_page(request, organisation, card_form=form)
    month, year = form.cleaned_data["exp"]
    try:
        card = payments.card_add_test_card(organisation=organisation, number=form.cleaned_data["number"],
                                           exp_month=month, exp_year=year, cvc=form.cleaned_data["cvc"])
    except stripe_api.StripeUnavailable:
        form.add_error(None, "Stripe did not answer in time. Try again in a minute.")
        return _buyer_page(request, organisation, card_form=form)
    except BillingError as error:
        form.add_error(None, f"The card was not saved: {error.message}")
        return _buyer_page(request, organisation, card_form=form)
    messages.success(request, f"{(card.brand or 'Card').title()} ending {card.last4} saved.")
    return redirect("billing:buyer-billing")


@login_required
@require_POST
def card_setup(request):
    """Outside the local peer: a SetupIntent whose client secret Stripe.js confirms in the browser (the card
    details go to Stripe only); Stripe then sends the browser to :func:`card_setup_done`."""
    organisation = _organisation(request)
    try:
        setup = payments.card_setup_start(organisation=organisation)
    except BillingError as error:
        messages.error(request, f"Stripe could not start saving a card ({error.message}). Try again in a minute.")
        return redirect("billing:buyer-billing")
    return render(request, "billing/card_setup.html", {
        "organisation": organisation, "client_secret": setup["client_secret"],
        "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "return_url": request.build_absolute_uri(reverse("billing:card-setup-done")),
    })


@login_required
@require_GET
def card_setup_done(request):
    organisation = _organisation(request)
    setup_intent_id = request.GET.get("setup_intent", "")
    try:
        card = payments.card_setup_complete(organisation=organisation, setup_intent_id=setup_intent_id)
    except BillingError as error:
        messages.error(request, f"The card was not saved: {error.message}")
    else:
        messages.success(request, f"{(card.brand or 'Card').title()} ending {card.last4} saved.")
    return redirect("billing:buyer-billing")


@login_required
@require_POST
def auto_top_up(request):
    organisation = _organisation(request)
    form = AutoTopUpForm(request.POST, organisation=organisation)
    if not form.is_valid():
        return _buyer_page(request, organisation, auto_form=form)
    try:
        rule = payments.auto_top_up_set(organisation=organisation, card=form.cleaned_data["card"],
                                        threshold_minor=form.threshold_minor, amount_minor=form.amount_minor,
                                        enabled=form.cleaned_data["enabled"])
    except BillingError as error:
        form.add_error(None, error.message)
        return _buyer_page(request, organisation, auto_form=form)
    currency = settings.CURRENCY
    money = lambda minor: format_minor(minor, currency)  # noqa: E731
    if rule.enabled:
        messages.success(request, f"Automatic top-up on: {money(rule.amount_minor)} whenever the balance falls "
                                  f"under {money(rule.threshold_minor)}.")
    else:
        messages.success(request, "Automatic top-up is off.")
    return redirect("billing:buyer-billing")


@login_required
@require_GET
def receipt(request, pk: int):
    organisation = _organisation(request)
    top_up = reports.top_up_for(organisation=organisation, pk=pk)
    if top_up is None:
        raise Http404("No such receipt.")
    return render(request, "billing/receipt.html", {"organisation": organisation, "top_up": top_up,
                                                    "refunds": [r for r in top_up.refunds.all() if r.status != "failed"]})


@login_required
@require_GET
def statement(request, year: str, month: str):
    """The organisation's monthly statement as CSV: every ledger entry on its balance and reserved accounts
    in the month (UTC), with running balances, opening and closing lines."""
    organisation = _organisation(request)
    year, month = int(year), int(month)
    if not 1 <= month <= 12 or not 2000 <= year <= 9999:
        raise Http404("No such month.")
    first = date(year, month, 1)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="statement-{organisation.slug}-{year}-{month:02d}.csv"'
    writer = csv.writer(response)
    for row in reports.statement_rows(organisation=organisation, month=first, currency=settings.CURRENCY):
        writer.writerow(row)
    return response


# --- operator ------------------------------------------------------------------------------------------

def _require_staff(request) -> None:
    if not request.user.is_staff:
        raise PermissionDenied("Operator pages are for the platform's staff.")


@login_required
def operator_billing(request):
    _require_staff(request)
    now, currency = timezone.now(), settings.CURRENCY
    chart = reports.platform_revenue_chart(now=now, currency=currency)
    payables, next_at = reports.payables_due(now=now, currency=currency)
    runs = reports.reconciliation_history()
    for run in runs:
        run.took_s = (run.finished_at - run.started_at).total_seconds() if run.finished_at else None
    totals = reports.platform_totals(currency=currency)
    return render(request, "billing/operator_billing.html", {
        "currency": currency, "chart": [p.as_json() for p in chart], "chart_days": chart,
        "revenue_30d": sum(int(p.value) for p in chart), "totals": totals,
        "held_at_stripe": -totals["stripe_clearing"], "stripe_fees": -totals["stripe_fees"],
        "dispute_losses": -totals["dispute_losses"],
        "payables": payables, "next_at": next_at, "owed": sum(p.balance_minor for p in payables),
        "paid_next": sum(p.payable_minor for p in payables if p.will_be_paid),
        "held_next": sum(p.balance_minor - (p.payable_minor if p.will_be_paid else 0) for p in payables),
        "failed_payouts": reports.failed_payouts(), "failed_webhooks": reports.failed_buyer_webhooks(),
        "event_failures": reports.stripe_event_failures(),
        "runs": runs, "latest_run": runs[0] if runs else None,
        "holdback_days": settings.STRIPE_PAYOUT_HOLDBACK_DAYS, "min_payout_minor": settings.STRIPE_MIN_PAYOUT_MINOR,
    })


@login_required
@require_POST
def operator_reconcile(request):
    """Run the (read-only) reconciliation now and store the run."""
    _require_staff(request)
    run = reconciliation_run(triggered_by=request.user)
    if run.error:
        messages.error(request, f"The reconciliation could not finish: {run.error}")
    elif run.differences:
        messages.warning(request, f"Reconciliation found {len(run.differences)} difference(s): listed below.")
    else:
        messages.success(request, "Reconciliation: no difference between the ledger and Stripe.")
    return redirect(reverse("billing:operator-billing") + "#reconciliation")
