"""Template filters that show money the way buyers and owners read it."""

from decimal import Decimal

from django import template

from billing.money import MICROS_PER_MAJOR, format_minor

register = template.Library()


@register.filter
def micros_dollars(micros) -> str:
    """Micro-units as dollars with enough decimals to show the price: 47185 → "$0.0472"."""
    if micros is None or micros == "":
        return "—"
    value = Decimal(int(micros)) / MICROS_PER_MAJOR
    places = 2 if value >= 1 else 4 if value >= Decimal("0.001") else 6
    return f"${value:,.{places}f}"


@register.filter
def micros_decimal(micros) -> str:
    """Micro-units as an exact decimal of the major unit, for a form's field: 20000 → "0.02"; None → ""."""
    if micros is None or micros == "":
        return ""
    value = Decimal(int(micros)) / MICROS_PER_MAJOR
    return f"{value.normalize():f}"


@register.filter
def minor_money(minor, currency: str = "usd") -> str:
    """Minor units (cents) of ``currency`` as an amount: 12345 → "$123.45"."""
    if minor is None or minor == "":
        return "—"
    return format_minor(int(minor), str(currency))


@register.filter
def duration(seconds) -> str:
    """Seconds as a short duration: 75 → "1 min 15 s", 5400 → "1 h 30 min"."""
    if seconds is None:
        return "—"
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min" + (f" {secs} s" if secs and minutes < 10 else "")
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    return f"{hours // 24} days {hours % 24} h"
