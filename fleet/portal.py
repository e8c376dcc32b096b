"""Read-only helpers for the owner's pages: what a car is doing, in the owner's words, and its last 30 days.

Nothing here writes; the pages change things through fleet.services.
"""

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from billing.models import MeterRecord
from billing.money import femto_per_minor, format_femto_as_minor
from billing.selectors import EARNINGS_STAND, vehicle_earnings_femto
from fleet import eligibility
from fleet.models import Vehicle, WorkUnit
from fleet.selectors import (
    policy_rules,
    vehicle_mops_per_s,
    vehicle_rate_proven,
    vehicle_status,
    vehicle_usage,
    vehicles_of,
)
from marketplace.models import AuctionRound

WEEKDAYS = [(0, "Monday"), (1, "Tuesday"), (2, "Wednesday"), (3, "Thursday"), (4, "Friday"), (5, "Saturday"),
            (6, "Sunday")]
WEEKDAY_NAMES = dict(WEEKDAYS)

STATUS_LABELS = {
    "offline": "Offline", "driving": "Driving", "paused": "Paused", "limited": "Limited",
    "working": "Working", "idle": "Parked and idle",
}

_REASON_OF_TEXT = {text: reason for reason, text in eligibility.REASONS.items()}


@dataclass(frozen=True)
class CurrentLease:
    job_id: int
    seq: int
    since: datetime
    price_micros: int | None


@dataclass
class CarSnapshot:
    """Everything the car page's live block shows."""

    vehicle: Vehicle
    status: str
    label: str
    reason: str | None
    explanation: str
    leases: list[CurrentLease]
    usage: eligibility.Usage
    units_done: int
    earnings_femto: int
    next_departure: tuple[datetime, float] | None
    currency: str = field(default_factory=lambda: settings.CURRENCY)
    capacity: list[str] = field(default_factory=list)

    @property
    def earnings_cents(self) -> str:
        return format_femto_as_minor(self.earnings_femto, self.currency)

    @property
    def energy_today(self) -> str:
        return energy_text(self.usage.energy_today_kwh)

    @property
    def energy_month(self) -> str:
        return energy_text(self.usage.energy_month_kwh)

    @property
    def data_today(self) -> str:
        mb = self.usage.data_today_mb
        return f"{mb:,.1f} MB" if mb >= 1 else f"{mb * 1000:.0f} kB"


def energy_text(kwh: float) -> str:
    """Energy in the unit that reads best: kWh from one kWh up, else Wh."""
    if kwh >= 1:
        return f"{kwh:,.2f} kWh"
    wh = kwh * 1000
    if wh == 0:
        return "0 Wh"
    if wh >= 100:
        return f"{wh:.0f} Wh"
    if wh >= 1:
        return f"{wh:.1f} Wh"
    return f"{wh:.3f} Wh" if wh >= 0.001 else "under 0.001 Wh"


def window_text(window: dict, *, short: bool = False) -> str:
    """An availability window in words: "Monday 22:00–06:00 next day", "Friday all day"."""
    day = WEEKDAY_NAMES[window["weekday"]]
    day = day[:3] if short else day
    start, end = window["start"], window["end"]
    if start == end:
        return f"{day} all day" if start == "00:00" else f"{day} from {start}, 24 hours"
    return f"{day} {start}–{end}" + (" next day" if end < start and end != "00:00" else "")


def owner_explanation(*, vehicle: Vehicle, status: str, reason: str | None, usage: eligibility.Usage) -> str:
    """Why the car is in its state, said to its owner, with the numbers that matter."""
    policy = vehicle.policy
    if status == "working":
        return "Computing for buyers now."
    if status == "idle":
        return "Parked and allowed to work; waiting for a buyer's job."
    texts = {
        eligibility.PAUSED: "You paused it. It takes no work until you resume it.",
        eligibility.OFFLINE: ("Its agent is not connected." if vehicle.token_hash else
                              "Its agent has not connected yet: pair it with a pairing code."),
        eligibility.NO_TELEMETRY: "Connected; waiting for the car's first status report.",
        eligibility.DRIVING: "On the road. It works only while parked.",
        eligibility.BATTERY_FLOOR: (f"The battery fell to your stop level ({policy.battery_floor_pct} %). "
                                    f"Work resumes above {policy.battery_resume_pct} %."),
        eligibility.DEPARTURE_RESERVE: "Keeping the charge you asked for at your next departure.",
        eligibility.TEMPERATURE: (f"Warmer than your limit of {policy.max_temp_c:g} °C, or no temperature reading."
                                  if policy.max_temp_c is not None else "Too warm."),
        eligibility.OUTSIDE_WINDOW: "Outside the hours you made it available.",
        eligibility.ENERGY_BUDGET: (f"Your energy budget is used up ({usage.energy_today_kwh:.2f} kWh today, "
                                    f"{usage.energy_month_kwh:.2f} kWh this month)."),
        eligibility.NOT_PLUGGED_IN: "Not plugged in, and you allow work only while it is.",
        eligibility.NOT_ON_WIFI: "Not on WiFi, and you allow work on WiFi only.",
        eligibility.DATA_BUDGET: f"Today's data budget is used up ({usage.data_today_mb:.1f} MB).",
    }
    return texts.get(reason, eligibility.REASONS.get(reason, ""))


def capacity_lines(*, vehicle: Vehicle) -> list[str]:
    """What the car is sold at, per number format, in words: buyers get the capacity a car has proven
    (docs/vehicle-protocol.md, "Capacity is measured")."""
    lines = []
    for throughput in vehicle.hardware.throughputs.all():
        precision = throughput.precision
        proven = vehicle_rate_proven(vehicle=vehicle, precision=precision)
        sold = vehicle_mops_per_s(vehicle=vehicle, precision=precision)
        if proven is None:
            lines.append(f"{precision.upper()}: nothing delivered yet, so it is offered a small trial figure of "
                         f"{sold:,} Mops/s until it has.")
        else:
            lines.append(f"{precision.upper()}: delivered {proven:,.0f} Mops/s lately; offered at {sold:,} Mops/s.")
    return lines


def car_snapshot(*, vehicle: Vehicle, now: datetime) -> CarSnapshot:
    leases = [CurrentLease(job_id, seq, since, price) for job_id, seq, since, price in
              WorkUnit.objects.filter(leased_to=vehicle, state=WorkUnit.State.LEASED)
              .order_by("leased_at").values_list("job_id", "seq", "leased_at", "price_micros")]
    status, text = vehicle_status(vehicle=vehicle, now=now, working=bool(leases))
    reason = _REASON_OF_TEXT.get(text)
    policy = vehicle.policy
    usage = vehicle_usage(vehicle=vehicle, tz=policy.timezone, now=now)
    departure = eligibility.next_departure(policy_rules(policy=policy, vehicle=vehicle), now)
    if departure:
        departure = (departure[0].astimezone(ZoneInfo(policy.timezone)), departure[1])
    return CarSnapshot(
        vehicle=vehicle, status=status, label=STATUS_LABELS.get(status, status.title()), reason=reason,
        explanation=owner_explanation(vehicle=vehicle, status=status, reason=reason, usage=usage),
        leases=leases, usage=usage, units_done=vehicle.units_completed.count(),
        earnings_femto=vehicle_earnings_femto(vehicle=vehicle), next_departure=departure,
        capacity=capacity_lines(vehicle=vehicle))


def dashboard_cars(*, owner, now: datetime) -> list[dict]:
    """The owner's cars with their status, for the dashboard's live table."""
    vehicles = list(vehicles_of(owner=owner).annotate(units_done=Count("units_completed", distinct=True)))
    working = set(WorkUnit.objects.filter(leased_to__in=vehicles, state=WorkUnit.State.LEASED)
                  .values_list("leased_to_id", flat=True))
    cars = []
    for vehicle in vehicles:
        status, text = vehicle_status(vehicle=vehicle, now=now, working=vehicle.pk in working)
        cars.append({"vehicle": vehicle, "status": status, "label": STATUS_LABELS.get(status, status.title()),
                     "explanation": owner_explanation(vehicle=vehicle, status=status, reason=_REASON_OF_TEXT.get(text),
                                                      usage=vehicle_usage(vehicle=vehicle, tz=vehicle.policy.timezone,
                                                                          now=now)),
                     "units_done": vehicle.units_done})
    return cars


# --- the last 30 days ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Day:
    day: date
    energy_kwh: float
    earnings_femto: int
    units: int

    @property
    def cents(self) -> str:
        return format_femto_as_minor(self.earnings_femto, settings.CURRENCY)

    @property
    def energy(self) -> str:
        return energy_text(self.energy_kwh)


def daily_series(*, vehicle: Vehicle, tz: str, now: datetime, days: int = 30) -> list[Day]:
    """Energy, earnings and units per day of the owner's calendar, the last ``days`` days up to today
    (days without work included, as zeros)."""
    zone = ZoneInfo(tz)
    today = now.astimezone(zone).date()
    first = today - timedelta(days=days - 1)
    start = eligibility.wall_clock_instant(first, datetime.min.time(), zone)
    rows = (MeterRecord.objects.filter(vehicle=vehicle, created_at__gte=start, currency=settings.CURRENCY)
            .annotate(day=TruncDate("created_at", tzinfo=zone)).values("day")
            .annotate(energy=Sum("energy_mwh"), earned=Sum("owner_femto", filter=EARNINGS_STAND), units=Count("pk")))
    by_day = {row["day"]: row for row in rows}
    series = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        row = by_day.get(day, {})
        series.append(Day(day=day, energy_kwh=(row.get("energy") or 0) / 10**6,
                          earnings_femto=row.get("earned") or 0, units=row.get("units") or 0))
    return series


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Tick:
    y: float
    label: str
    axis: bool

    @property
    def label_y(self) -> float:
        return round(self.y + 4, 2)


@dataclass(frozen=True)
class Panel:
    """One small bar chart, laid out for an inline SVG of ``width`` x ``height``."""

    title: str
    unit: str
    colour: str
    description: str
    bars: list[Bar]
    ticks: list[Tick]
    first_label: str
    last_label: str
    total: str
    width: int = 360
    height: int = 170
    left: int = 52
    right: int = 12
    bottom: int = 28

    @property
    def label_x(self) -> int:
        return self.left - 6

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def baseline(self) -> int:
        return self.height - self.bottom


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    power = 10 ** _floor_log10(value)
    for step in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _floor_log10(value: float) -> int:
    exponent = 0
    while value >= 10:
        value /= 10
        exponent += 1
    while value < 1:
        value *= 10
        exponent -= 1
    return exponent


def _number(value: float, *, top: float) -> str:
    """A tick label with as many decimals as the axis's scale needs (never an exponent)."""
    decimals = min(max(0, 2 - _floor_log10(top)), 6) if top > 0 else 0
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _panel(*, title: str, unit: str, colour: str, values: list[float], days: list[date], labels: list[str],
           total: str, width: int = 360, height: int = 170, left: int = 52, right: int = 12, top: int = 12,
           bottom: int = 28) -> Panel:
    top_value = _nice_max(max(values, default=0) * 1.05)
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(len(values), 1)
    bars = []
    for i, (value, day, label) in enumerate(zip(values, days, labels)):
        h = value / top_value * plot_h
        if value > 0:
            h = max(h, 1.5)  # a day with a little work stays visible
        bars.append(Bar(x=round(left + i * slot + slot * 0.15, 2), y=round(height - bottom - h, 2),
                        width=round(slot * 0.7, 2), height=round(h, 2), title=f"{day:%a %d %b}: {label}"))
    ticks = [Tick(y=round(height - bottom - f * plot_h, 2), label=_number(top_value * f, top=top_value), axis=f == 0)
             for f in (0, 0.5, 1)]
    busy = sum(1 for v in values if v > 0)
    description = (f"{title} per day over the last {len(values)} days: {busy} day{'s' if busy != 1 else ''} with work, "
                   f"{total} in all; the highest day {_number(max(values, default=0), top=top_value)} {unit}.")
    return Panel(title=title, unit=unit, colour=colour, description=description, bars=bars, ticks=ticks,
                 first_label=f"{days[0]:%d %b}", last_label=f"{days[-1]:%d %b}", total=total,
                 width=width, height=height, left=left, right=right, bottom=bottom)


def usage_chart(series: list[Day], *, currency: str | None = None) -> list[Panel]:
    """Two panels: energy (Wh, or kWh once a day reaches one) and earnings (cents) per day."""
    currency = currency or settings.CURRENCY
    days = [d.day for d in series]
    per_cent = femto_per_minor(currency)
    kwh = [d.energy_kwh for d in series]
    in_wh = max(kwh, default=0) < 1
    energy = [v * 1000 for v in kwh] if in_wh else kwh
    # Pixel heights only: the amounts themselves stay exact (labels come from the integer femto amounts).
    cents = [d.earnings_femto / per_cent for d in series]
    return [
        _panel(title="Energy", unit="Wh" if in_wh else "kWh", colour="#0a5c8a", values=energy, days=days,
               labels=[f"{d.energy}, {d.units} unit{'s' if d.units != 1 else ''}" for d in series],
               total=energy_text(sum(kwh))),
        _panel(title="Earnings", unit="¢", colour="#0b7a5a", values=cents, days=days,
               labels=[f"{format_femto_as_minor(d.earnings_femto, currency)} ¢" for d in series],
               total=f"{format_femto_as_minor(sum(d.earnings_femto for d in series), currency)} ¢"),
    ]


@dataclass(frozen=True)
class Standing:
    """What the checks of a car's results have shown, for its owner (docs/verification.md)."""

    level: str  # "suspended", "watched", "new", "trusted"
    title: str
    explanation: str
    voided: int  # its results voided when it was caught, their earnings taken back


def car_standing(*, vehicle: Vehicle) -> Standing:
    voided = vehicle.lease_history.filter(verdict="voided").count()
    checked = f"{vehicle.checks_passed} of its results checked and found right, {vehicle.wrong_results} wrong"
    taken = (f" The earnings of {voided} result{'s' if voided != 1 else ''} accepted before a check were taken "
             "back." if voided else "")
    if vehicle.suspended_at is not None:
        return Standing("suspended", "Suspended",
                        f"Since {vehicle.suspended_at:%Y-%m-%d %H:%M} UTC: {vehicle.suspension_reason}. It gets no "
                        f"work until the operator reinstates it (contact support).{taken}", voided)
    if vehicle.wrong_results and vehicle.wrong_recent:
        return Standing("watched", "Under watch",
                        f"A result disagreed with the platform's own computation: every result is checked again for "
                        f"a while, and another wrong one suspends the car. {checked}.{taken}", voided)
    if vehicle.results_streak < settings.VERIFY_PROBATION:
        return Standing("new", "New", f"The first results of a car are all checked. {checked}.", voided)
    return Standing("trusted", "In good standing", f"{checked}; a small share of its results is still checked.",
                    voided)


def recent_clearing_prices() -> dict[str, int]:
    """The latest clearing price of each market (precision) that traded, in micro-units per PetaOp."""
    prices: dict[str, int] = {}
    for market, price in (AuctionRound.objects.exclude(clearing_price_micros=None).order_by("-cleared_at")
                          .values_list("market", "clearing_price_micros")[:200]):
        prices.setdefault(market, price)
    return dict(sorted(prices.items()))
