"""The one eligibility rule: may this car take (or keep) work right now? Pure Python, no ORM.

The gateway checks it on every telemetry message and before every lease; the auction uses it to count
offered capacity. It returns the first reason the car may not work, or ``None``.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

PAUSED = "paused"
OFFLINE = "offline"
NO_TELEMETRY = "no_telemetry"
DRIVING = "driving"
BATTERY_FLOOR = "battery_floor"
NOT_ON_WIFI = "not_on_wifi"

REASONS = {
    PAUSED: "Paused by the owner",
    OFFLINE: "Offline",
    NO_TELEMETRY: "Waiting for the car's first status report",
    DRIVING: "Driving",
    BATTERY_FLOOR: "Battery at or below the owner's floor",
    NOT_ON_WIFI: "Not on WiFi (the owner allows WiFi only)",
}


@dataclass(frozen=True)
class Policy:
    battery_floor_pct: float
    wifi_only: bool
    paused: bool


@dataclass(frozen=True)
class LiveState:
    connected: bool
    last_seen_at: datetime | None
    battery_pct: float | None
    driving: bool
    plugged_in: bool
    on_wifi: bool


def ineligibility(*, policy: Policy, state: LiveState, now: datetime, stale_after: timedelta) -> str | None:
    if policy.paused:
        return PAUSED
    if not state.connected or state.last_seen_at is None or now - state.last_seen_at > stale_after:
        return OFFLINE
    if state.battery_pct is None:
        return NO_TELEMETRY
    if state.driving:
        return DRIVING
    if state.battery_pct <= policy.battery_floor_pct:
        return BATTERY_FLOOR
    if policy.wifi_only and not state.on_wifi:
        return NOT_ON_WIFI
    return None
