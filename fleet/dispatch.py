"""How much work a car is given: pure sizing rules, no ORM (see docs/vehicle-protocol.md, "Sizing").

Jobs are cut into small units (``DOCS_PER_UNIT`` documents). What a car receives for one ``work.request`` is a
batch of consecutive units sized to the car: its measured throughput for the precision (capped by the
hardware's nominal peak), its link (results are about 2 KB of base64 per 384-float vector; page images fetched
by URL are far larger, and counted too), and the time
it can still work before its owner's next departure, window end, battery floor or energy budget. Every unit
keeps its own lease and fencing epoch.
"""

import math

#: A car keeps at most this many seconds of work in hand: enough to bridge a round trip on a slow link and
#: the gateway's queueing, little enough that work taken back from a car that leaves is small.
PIPELINE_S = 4.0
#: A car is given only work it can finish in this share of the time it can still work.
PARKED_TIME_SHARE = 0.5
#: Bytes per result message beyond its documents' (framing, ids).
RESULT_OVERHEAD_BYTES = 200
#: The unit the welcome's in-flight limit is computed for, before the car has work: 8 documents of about
#: 128 tokens of the default embedding model (all-MiniLM-L6-v2, about 23.6 Mops per token), 384 dimensions.
REFERENCE_UNIT_MOPS = 24_000
REFERENCE_UNIT_RESULT_BYTES = 8 * 384 * 16 // 3
#: Uplink assumed for a car that did not report one (a slow home line).
DEFAULT_UPLINK_KBPS = 5_000
#: A lease lives at most this many times the time its car needs for the work it holds (lease_lifetime_s).
LEASE_LIFETIME_FACTOR = 4.0


def unit_seconds(*, unit_mops: int, result_bytes: int, mops_per_s: int, uplink_kbps: int | None,
                 input_bytes: int = 0) -> float:
    """Time for the car to fetch one unit's inputs (those fetched by URL), compute it and send its result back.
    Only the uplink's rate is reported; a car's downlink is taken to be at least as fast."""
    bits = (input_bytes + result_bytes + RESULT_OVERHEAD_BYTES) * 8
    return unit_mops / max(1, mops_per_s) + bits / ((uplink_kbps or DEFAULT_UPLINK_KBPS) * 1000)


def inflight_limit(*, unit_s: float, max_inflight: int) -> int:
    """How many leases the car may hold at once: PIPELINE_S of work, at least one, at most ``max_inflight``."""
    return max(1, min(max_inflight, math.ceil(PIPELINE_S / max(unit_s, 1e-9))))


def lease_lifetime_s(*, work_s: float, ttl_s: float, max_s: float) -> float:
    """How long a lease may live at most, whatever the car's heartbeats say: LEASE_LIFETIME_FACTOR times the
    ``work_s`` the car needs for everything it holds with this lease, at its own rate, plus one heartbeat
    TTL of grace; never more than ``max_s`` (the operator's LEASE_MAX_LIFETIME_S), never less than ``ttl_s``."""
    return max(ttl_s, min(max_s, LEASE_LIFETIME_FACTOR * work_s + ttl_s))


def strikes_standing(*, strikes: int, since_s: float | None, forgive_s: float) -> int:
    """The strikes a car still carries ``since_s`` seconds after its last one: one is forgiven every
    ``forgive_s``, so a car that stalled now and then soon works at its full limit again, and one that keeps
    sitting on its work keeps being struck."""
    if since_s is None:
        return 0
    return max(0, strikes - int(max(0.0, since_s) // forgive_s))


def inflight_after_strikes(*, limit: int, strikes: int) -> int:
    """A car whose leases ran out without a result may hold fewer: the limit halves per recent strike (down
    to one lease), so a car that hoards work soon holds one unit at a time."""
    return max(1, limit >> min(max(0, strikes), 5))


def batch_size(*, limit: int, held: int, unit_s: float, time_left_s: float | None) -> int:
    """How many more units to lease to a car holding ``held``: up to its in-flight limit, and only as many
    as it can finish (with what it holds) in PARKED_TIME_SHARE of its remaining working time. 0: none."""
    room = limit - held
    if time_left_s is not None:
        room = min(room, math.floor(time_left_s * PARKED_TIME_SHARE / max(unit_s, 1e-9)) - held)
    return max(0, room)
