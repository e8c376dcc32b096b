"""Read-only queries behind the billing pages: the owner's earnings, the buyer's balance and spend, the
operator's revenue, payables and failures. Nothing here writes; the pages change things through
billing.payments, billing.payouts and billing.reconcile.

Amounts stay integers: minor units (cents) from the ledger, femto-units from the meter records. Display
strings are made here with Decimal, never floats (floats only size the bars of a chart)."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import ROUND_DOWN, Decimal
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate, TruncMonth

from billing.models import (
    AutoTopUp,
    ConnectedAccount,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    MeterRecord,
    Payout,
    ReconciliationRun,
    SavedCard,
    SettlementRun,
    StripeEvent,
    StripeEventFailure,
    TopUp,
)
from billing.money import FEMTO_PER_MAJOR, femto_per_minor, format_major, format_minor, minor_to_major
from billing.payouts import owner_payable_minor, payout_due, settlement_key
from billing.selectors import EARNINGS_STAND, account_balance_minor, buyer_balance_minor
from fleet.models import OwnerPolicy, Vehicle
from marketplace.models import Job, WebhookDelivery

CHART_DAYS = 30


# --- display helpers -----------------------------------------------------------------------------------

def femto_money(femto: int, currency: str, places: int = 4) -> str:
    """An exact femto amount as money with ``places`` decimals, rounded down: 7_765_000_000_000 → "$7.7650"."""
    return format_major(Decimal(femto) / FEMTO_PER_MAJOR, currency, places, rounding=ROUND_DOWN)


def energy_kwh(mwh: int) -> Decimal:
    return Decimal(int(mwh)) / 10**6


def energy_text(mwh: int) -> str:
    """Milliwatt-hours in the unit that reads best."""
    if mwh >= 10**6:
        return f"{energy_kwh(mwh):,.2f} kWh"
    if mwh >= 1000:
        return f"{Decimal(mwh) / 1000:,.1f} Wh"
    return f"{mwh:,} mWh"


@dataclass(frozen=True)
class DayPoint:
    """One day of a chart: ``value`` sizes the bar (a float is fine there), ``label`` is the exact amount."""

    day: date
    value: float
    label: str

    def as_json(self) -> dict:
        return {"day": self.day.isoformat(), "value": self.value, "label": self.label}


def days_back(*, today: date, days: int = CHART_DAYS) -> list[date]:
    first = today - timedelta(days=days - 1)
    return [first + timedelta(days=i) for i in range(days)]


def day_start(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=zone)


def _account(kind: str, currency: str, **party) -> LedgerAccount | None:
    return LedgerAccount.objects.filter(kind=kind, currency=currency, **party).first()


def _balance(account: LedgerAccount | None) -> int:
    return account_balance_minor(account=account) if account else 0


# --- settlement timing ---------------------------------------------------------------------------------

def next_settlement_at(*, now: datetime) -> datetime:
    """When the next settlement can pay: the next hourly call if this ISO week has no run yet, else the
    first hour of next week (one run per week)."""
    if SettlementRun.objects.filter(key=settlement_key(now)).exists():
        monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        return monday + timedelta(days=7)
    return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


@dataclass(frozen=True)
class Payable:
    owner: object
    currency: str
    balance_minor: int
    payable_minor: int  # what the holdback lets go at the next settlement
    held_minor: int
    account: ConnectedAccount | None
    min_payout_minor: int

    @property
    def will_be_paid(self) -> bool:
        return payout_due(connected=self.account, payable_minor=self.payable_minor,
                          min_payout_minor=self.min_payout_minor)

    @property
    def reason(self) -> str:
        """Why the payable is (not) paid at the next settlement, in the owner's words."""
        if self.balance_minor <= 0:
            return "Nothing owed yet."
        if self.account is None:
            return "Not paid until Stripe payouts are set up."
        if not self.account.can_receive_transfers:
            return "Not paid until Stripe onboarding is finished."
        if self.payable_minor == 0:
            return (f"All of it was earned in the {settings.STRIPE_PAYOUT_HOLDBACK_DAYS} days before the settlement: "
                    f"it is held back and paid at a later one.")
        if self.payable_minor < self.min_payout_minor:
            return "Waits until what can be paid reaches the minimum payout."
        return "Paid at the next settlement."


def payable_for(*, owner, account: LedgerAccount | None, at: datetime, currency: str) -> Payable:
    connected = ConnectedAccount.objects.filter(owner=owner).first()
    balance = _balance(account)
    payable = owner_payable_minor(account=account, now=at, holdback_days=settings.STRIPE_PAYOUT_HOLDBACK_DAYS) \
        if account else 0
    return Payable(owner=owner, currency=currency, balance_minor=balance, payable_minor=payable,
                   held_minor=max(0, balance - payable), account=connected,
                   min_payout_minor=settings.STRIPE_MIN_PAYOUT_MINOR)


# --- owner ---------------------------------------------------------------------------------------------

def owner_timezone(*, owner) -> ZoneInfo:
    """The owner's time zone: their first car's policy's, else UTC."""
    name = (OwnerPolicy.objects.filter(vehicle__owner=owner).order_by("vehicle_id")
            .values_list("timezone", flat=True).first())
    try:
        return ZoneInfo(name or "UTC")
    except (KeyError, ValueError):
        return ZoneInfo("UTC")


def owner_daily(*, owner, now: datetime, currency: str, days: int = CHART_DAYS) -> list[dict]:
    """The owner's earnings (femto), energy (mWh) and units per day of their calendar, zeros included."""
    zone = owner_timezone(owner=owner)
    series = days_back(today=now.astimezone(zone).date(), days=days)
    rows = (MeterRecord.objects.filter(owner=owner, currency=currency, created_at__gte=day_start(series[0], zone))
            .annotate(day=TruncDate("created_at", tzinfo=zone)).values("day")
            .annotate(earned=Sum("owner_femto", filter=EARNINGS_STAND), energy=Sum("energy_mwh"), units=Count("pk")))
    by_day = {row["day"]: row for row in rows}
    return [{"day": d, "earned_femto": by_day.get(d, {}).get("earned") or 0,
             "energy_mwh": by_day.get(d, {}).get("energy") or 0, "units": by_day.get(d, {}).get("units") or 0}
            for d in series]


def owner_earnings_chart(daily: list[dict], currency: str) -> list[DayPoint]:
    per_minor = femto_per_minor(currency)
    return [DayPoint(day=d["day"], value=d["earned_femto"] / per_minor,
                     label=f"{femto_money(d['earned_femto'], currency)} · {d['units']} unit{'s' if d['units'] != 1 else ''}"
                           f" · {energy_text(d['energy_mwh'])}")
            for d in daily]


@dataclass(frozen=True)
class CarEarnings:
    vehicle: object
    units: int
    earned_femto: int
    energy_mwh: int
    earned_30d_femto: int
    energy_30d_mwh: int


def owner_cars(*, owner, now: datetime, currency: str) -> list[CarEarnings]:
    """Per car (removed cars that earned included): all-time and last-30-days earnings and energy."""
    since = now - timedelta(days=CHART_DAYS)
    rows = {row["vehicle"]: row for row in MeterRecord.objects.filter(owner=owner, currency=currency)
            .values("vehicle").annotate(
                units=Count("pk"), earned=Sum("owner_femto", filter=EARNINGS_STAND), energy=Sum("energy_mwh"),
                earned_30d=Sum("owner_femto", filter=EARNINGS_STAND & Q(created_at__gte=since)),
                energy_30d=Sum("energy_mwh", filter=Q(created_at__gte=since)))}
    vehicles = Vehicle.objects.filter(Q(owner=owner, removed_at=None) | Q(pk__in=rows.keys())).order_by("name", "pk")
    return [CarEarnings(vehicle=v, units=rows.get(v.pk, {}).get("units") or 0,
                        earned_femto=rows.get(v.pk, {}).get("earned") or 0,
                        energy_mwh=rows.get(v.pk, {}).get("energy") or 0,
                        earned_30d_femto=rows.get(v.pk, {}).get("earned_30d") or 0,
                        energy_30d_mwh=rows.get(v.pk, {}).get("energy_30d") or 0) for v in vehicles]


def energy_cost(*, energy_mwh: int, price_per_kwh: Decimal | None) -> Decimal | None:
    """The energy's cost in the major unit at ``price_per_kwh`` (major units per kWh), or None without a price."""
    if price_per_kwh is None:
        return None
    return energy_kwh(energy_mwh) * price_per_kwh


def owner_payouts(*, owner) -> list[Payout]:
    return list(Payout.objects.filter(owner=owner).select_related("run").prefetch_related("reversals")
                .order_by("-created_at", "-pk")[:50])


def owner_upcoming(*, owner, now: datetime, currency: str) -> tuple[Payable, datetime]:
    at = next_settlement_at(now=now)
    account = _account(LedgerAccount.Kind.OWNER, currency, owner=owner)
    return payable_for(owner=owner, account=account, at=at, currency=currency), at


# --- buyer ---------------------------------------------------------------------------------------------

def buyer_accounts(*, organisation, currency: str) -> tuple[LedgerAccount | None, LedgerAccount | None]:
    return (_account(LedgerAccount.Kind.BUYER, currency, organisation=organisation),
            _account(LedgerAccount.Kind.BUYER_RESERVED, currency, organisation=organisation))


@dataclass(frozen=True)
class BuyerSummary:
    currency: str
    balance_minor: int
    reserved_minor: int
    cards: list[SavedCard]
    top_ups: list[TopUp]
    auto_top_up: AutoTopUp | None


def buyer_summary(*, organisation, currency: str) -> BuyerSummary:
    return BuyerSummary(
        currency=currency, balance_minor=buyer_balance_minor(organisation=organisation, currency=currency),
        reserved_minor=buyer_balance_minor(organisation=organisation, currency=currency,
                                           kind=LedgerAccount.Kind.BUYER_RESERVED),
        cards=list(SavedCard.objects.filter(organisation=organisation).order_by("-created_at", "-pk")),
        top_ups=list(TopUp.objects.filter(organisation=organisation).order_by("-created_at", "-pk")[:20]),
        auto_top_up=AutoTopUp.objects.filter(organisation=organisation).select_related("card").first())


def _usage_entries(*, organisation, currency: str):
    return LedgerEntry.objects.filter(
        account__organisation=organisation, account__currency=currency, transaction__kind=LedgerTransaction.Kind.USAGE,
        account__kind__in=[LedgerAccount.Kind.BUYER, LedgerAccount.Kind.BUYER_RESERVED])


def buyer_spend_per_job(*, organisation, currency: str, limit: int = 50) -> list[dict]:
    """Per job, newest first: what the completed units were charged (ledger, minor units) and how many."""
    charged = {row["transaction__job"]: -(row["total"] or 0) for row in
               _usage_entries(organisation=organisation, currency=currency)
               .values("transaction__job").annotate(total=Sum("amount_minor"))}
    metered = {row["job"]: row for row in MeterRecord.objects.filter(EARNINGS_STAND, job__organisation=organisation,
                                                                     currency=currency, role=MeterRecord.Role.BUYER)
               .values("job").annotate(units=Count("pk"), tokens=Sum("tokens"), exact=Sum("charge_femto"))}
    jobs = Job.objects.filter(pk__in=set(charged) | set(metered)).select_related("ai_model").order_by("-created_at", "-pk")
    return [{"job": job, "charged_minor": charged.get(job.pk, 0), "units": metered.get(job.pk, {}).get("units") or 0,
             "tokens": metered.get(job.pk, {}).get("tokens") or 0,
             "exact": femto_money(metered.get(job.pk, {}).get("exact") or 0, currency)}
            for job in jobs[:limit]]


def buyer_spend_chart(*, organisation, currency: str, now: datetime, days: int = CHART_DAYS) -> list[DayPoint]:
    zone = ZoneInfo("UTC")
    series = days_back(today=now.astimezone(zone).date(), days=days)
    rows = {row["day"]: -(row["total"] or 0) for row in _usage_entries(organisation=organisation, currency=currency)
            .filter(transaction__created_at__gte=day_start(series[0], zone))
            .annotate(day=TruncDate("transaction__created_at", tzinfo=zone)).values("day")
            .annotate(total=Sum("amount_minor"))}
    return [DayPoint(day=d, value=rows.get(d, 0), label=format_minor(rows.get(d, 0), currency))
            for d in series]


def top_up_for(*, organisation, pk: int) -> TopUp | None:
    """A paid top-up of this organisation (a receipt exists only for those), else None."""
    return (TopUp.objects.filter(organisation=organisation, pk=pk, status=TopUp.Status.SUCCEEDED)
            .prefetch_related("refunds").first())


def statement_months(*, organisation, today: date) -> list[date]:
    """First days of the months that have ledger entries for the organisation, newest first (this month
    always included)."""
    months = {date(today.year, today.month, 1)}
    for month in (LedgerEntry.objects.filter(account__organisation=organisation)
                  .annotate(month=TruncMonth("transaction__created_at", tzinfo=ZoneInfo("UTC")))
                  .values_list("month", flat=True).distinct()):
        months.add(date(month.year, month.month, 1))
    return sorted(months, reverse=True)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime.combine(month, time.min, tzinfo=ZoneInfo("UTC"))
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return start, datetime.combine(following, time.min, tzinfo=ZoneInfo("UTC"))


def _csv_text(text: str) -> str:
    """Text that a spreadsheet will not run as a formula (descriptions carry names users chose)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def statement_rows(*, organisation, month: date, currency: str) -> Iterable[list]:
    """The monthly statement as CSV rows: every entry on the organisation's balance and reserved accounts in
    the month (UTC), oldest first, with each account's running balance and the running total; an opening
    and a closing line. Amounts in the major unit with the currency's decimals."""
    start, end = month_bounds(month)
    accounts = [a for a in buyer_accounts(organisation=organisation, currency=currency) if a]
    names = {LedgerAccount.Kind.BUYER: "balance", LedgerAccount.Kind.BUYER_RESERVED: "reserved"}
    running = {a.pk: LedgerEntry.objects.filter(account=a, transaction__created_at__lt=start)
               .aggregate(t=Sum("amount_minor"))["t"] or 0 for a in accounts}
    money = lambda minor: str(minor_to_major(int(minor), currency))  # noqa: E731
    by_kind = {a.kind: running[a.pk] for a in accounts}
    header = ["date_utc", "transaction", "kind", "description", "job", "account", "amount", "account_balance",
              "balance", "reserved", "total", "currency"]
    yield header
    opening = [start.isoformat(), "", "opening", f"Opening balance {month:%B %Y}", "", "", "", "",
               money(by_kind.get(LedgerAccount.Kind.BUYER, 0)), money(by_kind.get(LedgerAccount.Kind.BUYER_RESERVED, 0)),
               money(sum(running.values())), currency.upper()]
    yield opening
    entries = (LedgerEntry.objects.filter(account__in=accounts, transaction__created_at__gte=start,
                                          transaction__created_at__lt=end)
               .select_related("transaction", "account").order_by("transaction__created_at", "transaction_id", "pk"))
    for entry in entries.iterator(chunk_size=2000):
        running[entry.account_id] += entry.amount_minor
        by_kind[entry.account.kind] = running[entry.account_id]
        txn = entry.transaction
        yield [txn.created_at.isoformat(), txn.pk, txn.kind, _csv_text(txn.description), txn.job_id or "",
               names.get(entry.account.kind, entry.account.kind), money(entry.amount_minor),
               money(running[entry.account_id]), money(by_kind.get(LedgerAccount.Kind.BUYER, 0)),
               money(by_kind.get(LedgerAccount.Kind.BUYER_RESERVED, 0)), money(sum(running.values())), currency.upper()]
    yield [end.isoformat(), "", "closing", f"Closing balance {month:%B %Y}", "", "", "", "",
           money(by_kind.get(LedgerAccount.Kind.BUYER, 0)), money(by_kind.get(LedgerAccount.Kind.BUYER_RESERVED, 0)),
           money(sum(running.values())), currency.upper()]


# --- operator ------------------------------------------------------------------------------------------

def platform_revenue_chart(*, now: datetime, currency: str, days: int = CHART_DAYS) -> list[DayPoint]:
    """The platform fee booked per day (UTC): credits of the platform-fee account."""
    zone = ZoneInfo("UTC")
    series = days_back(today=now.astimezone(zone).date(), days=days)
    rows = {row["day"]: row["total"] or 0 for row in LedgerEntry.objects.filter(
        account__kind=LedgerAccount.Kind.PLATFORM_FEE, account__currency=currency, amount_minor__gt=0,
        transaction__created_at__gte=day_start(series[0], zone))
        .annotate(day=TruncDate("transaction__created_at", tzinfo=zone)).values("day").annotate(total=Sum("amount_minor"))}
    return [DayPoint(day=d, value=rows.get(d, 0), label=format_minor(rows.get(d, 0), currency))
            for d in series]


def platform_totals(*, currency: str) -> dict:
    return {kind: _balance(_account(kind, currency, organisation=None, owner=None)) for kind in (
        LedgerAccount.Kind.PLATFORM_FEE, LedgerAccount.Kind.STRIPE_CLEARING, LedgerAccount.Kind.STRIPE_FEES,
        LedgerAccount.Kind.DISPUTE_LOSSES, LedgerAccount.Kind.ROUNDING)}


def payables_due(*, now: datetime, currency: str) -> tuple[list[Payable], datetime]:
    """Every owner with a payable balance: what the next settlement would pay and what it holds back."""
    at = next_settlement_at(now=now)
    found = []
    for account in (LedgerAccount.objects.filter(kind=LedgerAccount.Kind.OWNER, currency=currency)
                    .select_related("owner").order_by("owner__email")):
        payable = payable_for(owner=account.owner, account=account, at=at, currency=currency)
        if payable.balance_minor:
            found.append(payable)
    return found, at


def failed_payouts(limit: int = 50) -> list[Payout]:
    return list(Payout.objects.filter(status=Payout.Status.FAILED).select_related("owner", "run", "account")
                .order_by("-updated_at")[:limit])


def failed_buyer_webhooks(limit: int = 50) -> list:
    return list(WebhookDelivery.objects.filter(state=WebhookDelivery.State.FAILED)
                .select_related("event", "endpoint", "endpoint__organisation").order_by("-last_attempt_at", "-pk")[:limit])


def stripe_event_failures(limit: int = 50) -> list[dict]:
    """Recent Stripe events that could not be processed, with whether a later delivery processed them."""
    failures = list(StripeEventFailure.objects.all()[:limit])
    done = set(StripeEvent.objects.filter(event_id__in=[f.event_id for f in failures]).values_list("event_id", flat=True))
    return [{"failure": f, "repaired": f.event_id in done} for f in failures]


def reconciliation_history(limit: int = 20) -> list[ReconciliationRun]:
    return list(ReconciliationRun.objects.select_related("triggered_by")[:limit])
