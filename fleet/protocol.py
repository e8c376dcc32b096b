"""The vehicle websocket protocol, version 1: one schema per message type, used by the gateway
(fleet.gateway) and the car's agent (fleet.agent) alike. See docs/vehicle-protocol.md.

Every message is a JSON object ``{"v": 1, "type": "<type>", ...fields}``. :func:`parse` validates an
incoming object against the schema of its direction and returns a typed message or raises
:class:`ProtocolError`; :func:`dump` turns a message into the JSON object to send.
"""

import dataclasses
import json
import math
from typing import ClassVar

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
#: The deepest nesting of arrays and objects a message may have (the protocol's own messages need 3).
MAX_DEPTH = 64
MAX_TEXTS_PER_UNIT = 64
#: A text of a unit.assign: at most this many characters (the schema's limit), and the texts of one unit at most
#: UNIT_TEXT_BYTES as JSON (non-ASCII characters escaped, as the encoder writes them), which leaves room in the message for the
#: workload's parameters (at most 16 KiB: fleet.workloads.base) and the other fields. The server cuts units
#: (marketplace.services.job_prepare) and shortens texts (fleet.workloads.base.fit_text) to stay within them.
MAX_TEXT_CHARS = 16_384
UNIT_TEXT_BYTES = 40 * 1024
#: The longest inputs_url of a unit.assign (docs/vehicle-protocol.md, "Inputs by URL").
MAX_INPUTS_URL = 256
#: Upper bound of any car's in-flight leases (the gateway derives each car's own limit, at most this).
MAX_INFLIGHT = 32

# Close codes (4000-4999 are the application's). The handshake itself is refused (HTTP 403) for a
# missing, wrong or revoked token, before the socket is accepted.
CLOSE_TOKEN_REVOKED = 4001
CLOSE_PROTOCOL_VIOLATION = 4002
CLOSE_REPLACED = 4003
#: No hello within GATEWAY_HELLO_TIMEOUT_S of the handshake.
CLOSE_HELLO_TIMEOUT = 4004
#: After hello, no frame at all (telemetry, heartbeat, anything) for GATEWAY_IDLE_TIMEOUT_S.
CLOSE_IDLE = 4005


#: Per-connection message rate: a bucket of RATE_BURST messages refilled at RATE_PER_S. A car's agent sends a
#: few messages a second at most (two per unit, plus telemetry and heartbeats every 5 s); messages beyond the
#: bucket are dropped with a ``rate_limited`` error, and a connection that goes on after RATE_STRIKES drops
#: is closed with CLOSE_PROTOCOL_VIOLATION.
RATE_PER_S = 50.0
RATE_BURST = 100
RATE_STRIKES = 200


class RateLimiter:
    """A token bucket (pure; the caller passes the clock). ``stamp`` is the time of the last ``allow`` call."""

    def __init__(self, *, rate_per_s: float = RATE_PER_S, burst: int = RATE_BURST):
        self.rate, self.burst = rate_per_s, burst
        self.tokens, self.stamp = float(burst), None

    def allow(self, now: float) -> bool:
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --- field validators ---------------------------------------------------------------------------------

def _str(value, name, max_len=256):
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError("bad_field", f"{name} must be a string of at most {max_len} characters")
    return value


def _int(value, name, lo=0, hi=2**53):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError("bad_field", f"{name} must be an integer between {lo} and {hi}")
    return value


def _num(value, name, lo=-1e12, hi=1e12):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise ProtocolError("bad_field", f"{name} must be a number between {lo} and {hi}")
    return float(value)


def _bool(value, name):
    if not isinstance(value, bool):
        raise ProtocolError("bad_field", f"{name} must be true or false")
    return value


def _list(value, name, item, max_items):
    if not isinstance(value, list) or len(value) > max_items:
        raise ProtocolError("bad_field", f"{name} must be a list of at most {max_items} items")
    return [item(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _lease_ref(value, name):
    if not isinstance(value, list) or len(value) != 2:
        raise ProtocolError("bad_field", f"{name} must be [unit_id, epoch]")
    return (_int(value[0], f"{name}.unit_id"), _int(value[1], f"{name}.epoch"))


def _mops_map(value, name):
    if not isinstance(value, dict) or len(value) > 8:
        raise ProtocolError("bad_field", f"{name} must be an object of at most 8 precisions")
    return {_str(k, f"{name} key", 8): _int(v, f"{name}.{k}", 0, 10**12) for k, v in value.items()}


# --- messages -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict] = {}
    OPTIONAL: ClassVar[frozenset] = frozenset()


# Car -> gateway
@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """First message after connecting: what the agent can run and how fast (measured), its uplink, and the
    leases it still holds from an earlier session (the gateway resumes those that are still current)."""
    TYPE = "hello"
    SCHEMA = {
        "agent_version": lambda v, n: _str(v, n, 32),
        "runtimes": lambda v, n: _list(v, n, lambda x, m: _str(x, m, 64), 16),
        "throughput_mops": _mops_map,
        "uplink_kbps": lambda v, n: None if v is None else _int(v, n, 1, 10**8),
        "leases": lambda v, n: tuple(_list(v, n, _lease_ref, MAX_INFLIGHT)),
        "tasks": lambda v, n: _list(v, n, lambda x, m: _str(x, m, 32), 16),
    }
    OPTIONAL = frozenset({"uplink_kbps", "leases", "tasks"})
    agent_version: str
    runtimes: list
    throughput_mops: dict
    uplink_kbps: int | None = None
    leases: tuple = ()  # of (unit_id, epoch)
    tasks: list = dataclasses.field(default_factory=lambda: ["embedding"])  # the workloads it runs (docs/workloads.md)


@dataclasses.dataclass(frozen=True)
class Telemetry(Message):
    TYPE = "telemetry"
    SCHEMA = {
        "battery_pct": lambda v, n: _num(v, n, 0, 100),
        "driving": _bool,
        "plugged_in": _bool,
        "on_wifi": _bool,
        "charging_kw": lambda v, n: _num(v, n, 0, 1000),
        "temp_c": lambda v, n: None if v is None else _num(v, n, -60, 150),
        "seq": lambda v, n: None if v is None else _int(v, n),
    }
    OPTIONAL = frozenset({"charging_kw", "temp_c", "seq"})
    battery_pct: float
    driving: bool
    plugged_in: bool
    on_wifi: bool
    charging_kw: float = 0.0
    temp_c: float | None = None
    seq: int | None = None  # when set, the gateway answers with an ack of the same seq (round-trip check)


@dataclasses.dataclass(frozen=True)
class Heartbeat(Message):
    """Keeps the socket and the car's leases alive; ``leases`` is what the car holds, so the gateway can
    withdraw any it no longer recognises (repairing a lost control message)."""
    TYPE = "heartbeat"
    SCHEMA = {"leases": lambda v, n: _list(v, n, _lease_ref, MAX_INFLIGHT)}
    leases: list


@dataclasses.dataclass(frozen=True)
class WorkRequest(Message):
    TYPE = "work.request"


def _optional(check):
    return lambda v, n: None if v is None else check(v, n)


def _object(value, name):
    if not isinstance(value, dict):
        raise ProtocolError("bad_field", f"{name} must be an object")
    return value


@dataclasses.dataclass(frozen=True)
class Result(Message):
    """A unit's result, one item per text in order: ``embeddings_b64`` for an embeddings unit (each a base64
    string of little-endian float32 values), ``outputs`` for any other workload (JSON values in the workload's
    result format, docs/workloads.md). Exactly one of them."""
    TYPE = "result"
    SCHEMA = {
        "unit_id": _int,
        "epoch": _int,
        "embeddings_b64": _optional(lambda v, n: _list(v, n, lambda x, m: _str(x, m, 16_384), MAX_TEXTS_PER_UNIT)),
        "outputs": _optional(lambda v, n: _list(v, n, lambda x, m: x, MAX_TEXTS_PER_UNIT)),
    }
    OPTIONAL = frozenset({"embeddings_b64", "outputs"})
    unit_id: int
    epoch: int
    embeddings_b64: list | None = None
    outputs: list | None = None

    def __post_init__(self):
        if (self.embeddings_b64 is None) == (self.outputs is None):
            raise ProtocolError("bad_field", "result: exactly one of embeddings_b64 and outputs is required")

    @property
    def items(self) -> list:
        return self.embeddings_b64 if self.embeddings_b64 is not None else self.outputs


@dataclasses.dataclass(frozen=True)
class Release(Message):
    """The car gives a lease back (for example: it is about to drive)."""
    TYPE = "release"
    SCHEMA = {"unit_id": _int, "epoch": _int, "reason": lambda v, n: _str(v, n, 64)}
    unit_id: int
    epoch: int
    reason: str


# Gateway -> car
@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE = "welcome"
    """``max_inflight``: the most leases this car may hold at once, derived from its hardware and link."""
    SCHEMA = {"vehicle_id": _int, "heartbeat_s": _int, "lease_ttl_s": _int,
              "max_inflight": lambda v, n: _int(v, n, 1, MAX_INFLIGHT)}
    vehicle_id: int
    heartbeat_s: int
    lease_ttl_s: int
    max_inflight: int


@dataclasses.dataclass(frozen=True)
class UnitAssign(Message):
    TYPE = "unit.assign"
    SCHEMA = {
        "unit_id": _int,
        "epoch": _int,
        "runtime": lambda v, n: _str(v, n, 64),
        "precision": lambda v, n: _str(v, n, 8),
        "texts": lambda v, n: _list(v, n, lambda x, m: _str(x, m, MAX_TEXT_CHARS), MAX_TEXTS_PER_UNIT),
        "lease_ttl_s": _int,
        "task": lambda v, n: _str(v, n, 32),
        "params": _object,
        "inputs_url": lambda v, n: _str(v, n, MAX_INPUTS_URL),
    }
    OPTIONAL = frozenset({"task", "params", "inputs_url"})
    unit_id: int
    epoch: int
    runtime: str
    precision: str
    texts: list
    lease_ttl_s: int
    task: str = "embedding"  # the workload (docs/workloads.md)
    params: dict = dataclasses.field(default_factory=dict)  # the job's parameters the workload's runtime needs
    #: Where the unit's inputs are, when they are too large for a message (page images): a path on the server
    #: the car GETs with its device token, answering {"inputs": [...]}; ``texts`` is then empty.
    inputs_url: str = ""


@dataclasses.dataclass(frozen=True)
class NoWork(Message):
    TYPE = "no_work"
    SCHEMA = {"reason": lambda v, n: _str(v, n, 64), "retry_after_s": lambda v, n: _num(v, n, 0, 3600)}
    reason: str
    retry_after_s: float


@dataclasses.dataclass(frozen=True)
class UnitWithdraw(Message):
    TYPE = "unit.withdraw"
    SCHEMA = {"unit_id": _int, "epoch": _int, "reason": lambda v, n: _str(v, n, 64)}
    unit_id: int
    epoch: int
    reason: str


@dataclasses.dataclass(frozen=True)
class ResultAck(Message):
    TYPE = "result.ack"
    SCHEMA = {"unit_id": _int, "epoch": _int, "accepted": _bool, "reason": lambda v, n: _str(v, n, 64)}
    unit_id: int
    epoch: int
    accepted: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class Ack(Message):
    """Answer to a telemetry message that carried a ``seq``."""
    TYPE = "ack"
    SCHEMA = {"seq": _int}
    seq: int


@dataclasses.dataclass(frozen=True)
class Error(Message):
    TYPE = "error"
    SCHEMA = {"code": lambda v, n: _str(v, n, 64), "message": lambda v, n: _str(v, n, 512)}
    code: str
    message: str


CLIENT_MESSAGES = {m.TYPE: m for m in (Hello, Telemetry, Heartbeat, WorkRequest, Result, Release)}
SERVER_MESSAGES = {m.TYPE: m for m in (Welcome, UnitAssign, NoWork, UnitWithdraw, ResultAck, Ack, Error)}


def decode(text: str) -> dict:
    """A text frame to a JSON object: at most MAX_MESSAGE_BYTES of UTF-8, nested at most MAX_DEPTH deep, its
    strings Unicode text. Whatever the frame holds, the answer is the object or a ProtocolError.

    The checks cost a message of the agent (ASCII, no escapes, a handful of brackets) two counts of brackets and
    a search for a backslash: 0.3 us on a telemetry message, which json.loads parses in 2.6 us, and 9 us on a
    16 KB result, parsed in 12 us (the counts go over every character; a result's booking costs milliseconds).
    Only a message that could fail a check pays for its exact form."""
    # A string's length is its characters; the limit is UTF-8 bytes, up to 4 a character (isascii() is O(1)).
    if len(text) > MAX_MESSAGE_BYTES or (not text.isascii() and len(text) > MAX_MESSAGE_BYTES // 4
                                         and len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES):
        raise ProtocolError("too_large", f"messages are limited to {MAX_MESSAGE_BYTES} bytes")
    try:
        obj = json.loads(text)
    except RecursionError:  # the parser recurses per level and gives up near the interpreter's limit
        raise ProtocolError("bad_json", f"message nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    # No value nests deeper than it has brackets: the exact walk only when there are more than MAX_DEPTH.
    if text.count("[") + text.count("{") > MAX_DEPTH and _nests_deeper(obj, MAX_DEPTH):
        raise ProtocolError("bad_json", f"message nests deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "message must be a JSON object")
    # A lone surrogate (an escape such as \ud800 without its pair) is no Unicode text: it could be neither
    # stored nor sent on. It arrives as an escape (a server decodes the frame as UTF-8, which has none), or in
    # a string handed over as it is.
    if (not text.isascii() or "\\" in text) and not _is_unicode(obj):  # an escape of any kind: a memchr away
        raise ProtocolError("bad_json", "message strings must be Unicode text (an unpaired surrogate escape)")
    return obj


def _nests_deeper(value, limit: int) -> bool:
    """Whether ``value`` has arrays or objects nested more than ``limit`` deep (level by level, no recursion)."""
    level = [value] if isinstance(value, (list, dict)) else []
    for _ in range(limit):
        level = [child for container in level for child in (container.values() if isinstance(container, dict)
                                                            else container) if isinstance(child, (list, dict))]
        if not level:
            return False
    return True


def _is_unicode(obj: dict) -> bool:
    """Whether every string of the parsed message, keys included, is encodable text (no lone surrogate)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse(obj: dict, registry: dict) -> Message:
    if obj.get("v") != VERSION:
        raise ProtocolError("bad_version", f"unsupported protocol version {obj.get('v')!r}; this gateway speaks {VERSION}")
    cls = registry.get(obj.get("type"))
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {obj.get('type')!r}")
    values = {}
    for name, check in cls.SCHEMA.items():
        if name in obj:
            values[name] = check(obj[name], name)
        elif name not in cls.OPTIONAL:
            raise ProtocolError("missing_field", f"{cls.TYPE}: field {name!r} is required")
    return cls(**values)


def dump(msg: Message) -> dict:
    # The fields as they are (dataclasses.asdict deep-copies every list, which cost more than encoding the
    # message): what is dumped is encoded at once, and a message's values are never nested dataclasses.
    return {"v": VERSION, "type": msg.TYPE, **msg.__dict__}


#: Encodes a dumped message for the wire: compact, one encoder for all (json.dumps with options builds one per call).
encode = json.JSONEncoder(separators=(",", ":")).encode
