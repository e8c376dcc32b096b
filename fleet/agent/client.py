"""The car's agent: pairs with the marketplace, then keeps a websocket session with the gateway and
computes the work units it leases (see fleet.protocol and docs/vehicle-protocol.md).

No Django here: this module runs on the car (or in the fleet simulator, fleet.agent.sim).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import ClassVar, Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from fleet import protocol
from fleet.agent.models import MODELS, get_runner, installed_runtimes, measure_throughput
from fleet.agent.workloads import RUNTIMES as WORKLOAD_RUNTIMES
from fleet.agent.workloads import compute as workload_compute
from fleet.agent.workloads.embedding import encode_embeddings

logger = logging.getLogger("fleet.agent")

AGENT_VERSION = "1.0.0"
#: How often sensors are polled for changes that are reported at once (driving starts or stops...).
SENSOR_POLL_S = 0.25
#: A work request unanswered this long is considered lost and may be sent again.
REQUEST_TIMEOUT_S = 30.0
#: Pause before asking for work again after the gateway answered with an Error.
ERROR_RETRY_S = 5.0
#: After a unit.assign, wait this long before asking again: the rest of its batch is on the way.
BATCH_SETTLE_S = 0.25
#: Telemetry unacknowledged for max(ACK_TIMEOUT_HEARTBEATS heartbeats, ACK_TIMEOUT_MIN_S) means a hung gateway.
ACK_TIMEOUT_HEARTBEATS = 3
ACK_TIMEOUT_MIN_S = 15.0
#: The stall fault's default: sit on a result this long beyond its lease's TTL (the sweep runs every few s).
STALL_MARGIN_S = 10.0
#: First reconnect delay; doubles per failed attempt up to ``max_backoff_s`` (full jitter).
BACKOFF_BASE_S = 1.0
#: Largest frame accepted from the gateway: enough for any message of MAX_MESSAGE_BYTES characters, so an
#: oversized one reaches protocol.decode, is logged and ignored, rather than closing the connection.
MAX_FRAME_BYTES = 4 * protocol.MAX_MESSAGE_BYTES


class PairingError(Exception):
    """The server refused the pairing code (or answered something unexpected)."""

    def __init__(self, message: str, code: str = "pairing_failed"):
        super().__init__(message)
        self.code = code


class AuthRefused(Exception):
    """The gateway refused the token (HTTP 403 at the handshake, or closed with CLOSE_TOKEN_REVOKED): final."""


class Replaced(Exception):
    """The gateway closed this session because another agent connected with the same token: final."""


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds pass (False; None waits for ever).

    Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that arrives as the awaited event is
    set, so a session's task cancelled at that moment ran on for ever and its car never stopped."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def pair(server_url: str, code: str, timeout: float = 10) -> dict:
    """Exchange a one-time pairing code for ``{"vehicle_id": int, "token": str}``."""
    request = urllib.request.Request(
        f"{server_url.rstrip('/')}/api/v1/fleet/pair/",
        data=json.dumps({"code": code}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        if not 400 <= exc.code < 500:
            raise
        try:
            error = json.loads(exc.read())["error"]
            raise PairingError(str(error["message"]), str(error["code"])) from None
        except (ValueError, KeyError, TypeError):
            raise PairingError(f"pairing refused (HTTP {exc.code})") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise PairingError("unexpected pairing response from the server") from None
    if not (
        isinstance(body, dict)
        and isinstance(body.get("vehicle_id"), int)
        and not isinstance(body["vehicle_id"], bool)
        and isinstance(body.get("token"), str)
    ):
        raise PairingError("unexpected pairing response from the server")
    return {"vehicle_id": body["vehicle_id"], "token": body["token"]}


def wait_until_up(server_url: str, timeout: float = 60.0) -> bool:
    """Poll the server's /healthz until it answers 200 (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(server_url.rstrip("/") + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


class InputsUnavailable(Exception):
    """A unit's inputs could not be fetched (the lease ended, the server refused or could not be reached)."""


#: Seconds to wait for a unit's inputs; the largest a unit takes (fleet.workloads.base.Workload.max_unit_bytes,
#: 8 MB) passes a 5 Mbps link in about 13 s.
INPUTS_TIMEOUT_S = 60
#: The most a unit's inputs may weigh as the server sends them (JSON): more is refused, not read.
MAX_INPUTS_BYTES = 16 * 1024 * 1024


def fetch_inputs(url: str, token: str, timeout: float = INPUTS_TIMEOUT_S) -> list[str]:
    """A unit's inputs from the server (docs/vehicle-protocol.md, "Inputs by URL"): a list of strings. The car
    keeps them in memory only, like every input (it never persists one)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_INPUTS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise InputsUnavailable(f"the server answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InputsUnavailable(f"the server could not be reached: {exc}") from None
    if len(body) > MAX_INPUTS_BYTES:
        raise InputsUnavailable("the inputs are larger than the agent takes")
    try:
        inputs = json.loads(body)["inputs"]
    except (ValueError, KeyError, TypeError):
        raise InputsUnavailable("the server's answer is not {\"inputs\": [...]}") from None
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        raise InputsUnavailable("the inputs are not a list of strings")
    return inputs


def websocket_url(server_url: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/ws/vehicle/``."""
    parts = urllib.parse.urlsplit(server_url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes:
        raise ValueError(f"server URL must be http(s)://..., got {server_url!r}")
    return urllib.parse.urlunsplit((schemes[parts.scheme], parts.netloc, parts.path.rstrip("/") + "/ws/vehicle/", "", ""))


def decode_embedding(b64: str) -> np.ndarray:
    """Inverse of :func:`encode_embeddings` for one row."""
    return np.frombuffer(base64.b64decode(b64, validate=True), dtype="<f4")


def measure_mops(runtimes: list[str], seconds: float = 1.0) -> dict[str, int]:
    """Measured mega-ops/s per precision on this machine (blocking: about ``seconds`` per encoder and
    precision). With several encoders a precision gets the slowest one's figure. Other runtimes (OCR) are not
    measured: their ops per unit are scaled to the encoder's on the reference machine (fleet.agent.ocr)."""
    mops: dict[str, int] = {}
    for slug in runtimes:
        spec = MODELS[slug]
        if spec.kind != "encoder":
            continue
        for precision in spec.precisions:
            value = int(measure_throughput(slug, precision, seconds) * spec.ops_per_token / 1e6)
            mops[precision] = min(value, mops.get(precision, value))
    return mops


_default_executor: concurrent.futures.ThreadPoolExecutor | None = None
_default_executor_lock = threading.Lock()


def default_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's shared executor for inference."""
    global _default_executor
    with _default_executor_lock:
        if _default_executor is None:
            _default_executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fleet-agent")
        return _default_executor


class Sensors(Protocol):
    """What the agent reads from the car; on a real car these come from the vehicle bus. Optional attributes,
    read when present: ``charging_kw`` and ``temp_c`` (telemetry), ``uplink_kbps`` (the hello)."""

    @property
    def battery_pct(self) -> float: ...

    @property
    def driving(self) -> bool: ...

    @property
    def plugged_in(self) -> bool: ...

    @property
    def on_wifi(self) -> bool: ...

    def on_work(self, seconds: float, watts: float) -> None:
        """Called after each computed unit with the seconds it kept the computer busy and the computer's draw."""


@dataclasses.dataclass
class StaticSensors:
    """Fixed readings (settable, e.g. by tests); work does not change them."""

    battery_pct: float = 80.0
    driving: bool = False
    plugged_in: bool = False
    on_wifi: bool = True
    charging_kw: float = 0.0
    temp_c: float | None = None
    uplink_kbps: int | None = None  # the link's upload speed, reported in the hello (None: unknown)

    def on_work(self, seconds: float, watts: float) -> None:
        """Static readings: nothing drains."""


def _probability(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("not a number") from None


def _whole(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("not a number (a whole number is expected)") from None


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return raw == "1"


#: The largest throughput figure a hello may carry (fleet.protocol's limit on throughput_mops).
MAX_DECLARED_MOPS = 10**12
#: The first_words cheat embeds this many words of each text.
FIRST_WORDS = 4


@dataclasses.dataclass(frozen=True)
class Faults:
    """Faults and cheats the agent injects on purpose, for chaos tests, cheating tests and the simulator; all
    off by default.

    Faults (``KINDS``). Each probability applies per lease: when the car takes a lease, one draw per kind
    (from a ``random.Random(seed)`` of its own) decides which of these happen to it:

    * ``drop_socket``: when the unit's result is ready, abort the connection instead of sending it (no close
      frame, no release), as a car losing its network would. The agent reconnects, lists the lease in its
      hello and sends the result in the new session.
    * ``stall``: sit on the finished result for ``stall_s`` seconds (default: the lease's TTL plus
      STALL_MARGIN_S, so the lease expires), sending no heartbeats meanwhile and ignoring withdrawals of that
      lease, then send the result anyway: the gateway must refuse it as stale.
    * ``duplicate``: send the result message twice.
    * ``corrupt``: send a result whose first vector is twice unit length (or, for a unit without texts, one
      vector too many), which the gateway's result check must refuse.
    * ``late``: send the result ``late_s`` seconds after it is ready; heartbeats go on, so the lease stays
      current, and a withdrawal meanwhile is honoured.

    Result cheats (``CHEATS``): a dishonest result that is still well formed (one unit-norm, finite float32
    vector of the model's size per text), so that no shape check catches it. At most one applies to a result:
    when the worker computes a unit, one draw (from a random stream of its own, so that cheats do not change
    which leases the faults above hit) picks a cheat with its probability; so the cheats' probabilities may
    add up to 1 at most.

    * ``random_vectors``: random unit vectors, one per text; nothing is computed.
    * ``one_vector``: the true embedding of the first text, sent for every text of the unit (only that text
      is computed). With a single text this is the honest result.
    * ``rotate_rows``: the true embeddings with the rows rotated by one: row i gets row i+1's vector, the last
      row the first's. With a single text this is the honest result.
    * ``negate``: the true embeddings negated.
    * ``replay``: the true embeddings of an earlier unit this car computed honestly (the last one, of the same
      model, if it was another unit), rows repeated or cut to the unit's count; nothing is computed. With no
      such unit yet it sends random vectors instead (counted as ``random_vectors``).
    * ``first_words``: the true embeddings of the first FIRST_WORDS (4) words of each text, computed (cheaper
      than the whole texts). When no text is longer than that this is the honest result.

    A cheat that cannot change the result (the honest cases above, or a unit without texts) is not applied.
    Faults still apply to a cheated result (a corrupt one is corrupted after the cheat).

    Car-level modes (not per lease):

    * ``cheat_after=N``: honest until N of its results have been sent or are waiting to be sent, then the
      cheats' probabilities apply (a car that builds trust first). Default 0. Faults are not delayed.
    * ``black_hole``: says hello, sends telemetry and heartbeats, and never sends a work request. (A unit
      assigned to it anyway is handled like by any car.)
    * ``hoard``: takes the leases it is given and never computes them, never sends their results and never
      releases them (not when driving, nor when stopping); it lists them in its heartbeats and its hellos,
      honours withdrawals, and asks for more work whenever it holds fewer than its capacity.
    * ``declare_mops=X``: every hello declares X mega-ops per second for each precision of its runtimes, in
      place of the measured (or given) figure.

    Several kinds can hit one lease. ``AgentStats.faults_injected`` counts what really happened, by kind: faults
    when they happen, a cheat per result message sent with it (a duplicate once), ``hoard`` per lease hoarded,
    ``black_hole`` per session in which it asked for nothing, ``declare_mops`` per hello that lied.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("drop_socket", "stall", "duplicate", "corrupt", "late")
    CHEATS: ClassVar[tuple[str, ...]] = ("random_vectors", "one_vector", "rotate_rows", "negate", "replay", "first_words")
    #: How ``parse`` reads each setting that is not a probability; ``__post_init__`` then checks every value.
    READERS: ClassVar[dict[str, Callable[[str], object]]] = {
        "stall_s": _probability, "late_s": _probability, "seed": _whole,
        "cheat_after": _whole, "black_hole": _flag, "hoard": _flag, "declare_mops": _whole,
    }

    drop_socket: float = 0.0
    stall: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    late: float = 0.0
    stall_s: float | None = None
    late_s: float = 10.0
    seed: int | None = None
    random_vectors: float = 0.0
    one_vector: float = 0.0
    rotate_rows: float = 0.0
    negate: float = 0.0
    replay: float = 0.0
    first_words: float = 0.0
    cheat_after: int = 0
    black_hole: bool = False
    hoard: bool = False
    declare_mops: int | None = None

    def __post_init__(self):
        for kind in (*self.KINDS, *self.CHEATS):
            p = getattr(self, kind)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"fault probability {kind}={p!r} must be a number between 0 and 1")
        total = sum(getattr(self, kind) for kind in self.CHEATS)
        if total > 1 + 1e-9:
            raise ValueError(f"the cheat probabilities add up to {total:g}: at most one cheat applies to a result, "
                             "so they must add up to 1 or less")
        for name in ("stall_s", "late_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a number of seconds, 0 or more")
        if isinstance(self.cheat_after, bool) or not isinstance(self.cheat_after, int) or self.cheat_after < 0:
            raise ValueError(f"cheat_after={self.cheat_after!r} must be a whole number of results, 0 or more")
        for name in ("black_hole", "hoard"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False (1 or 0 in a spec)")
        if self.black_hole and self.hoard:
            raise ValueError("black_hole and hoard exclude each other: a black hole asks for no work to hoard")
        mops = self.declare_mops
        if mops is not None and (isinstance(mops, bool) or not isinstance(mops, int) or not 0 <= mops <= MAX_DECLARED_MOPS):
            raise ValueError(f"declare_mops={mops!r} must be a whole number of mega-ops per second, "
                             f"0 to {MAX_DECLARED_MOPS:.0e}")

    @property
    def enabled(self) -> bool:
        return (any(getattr(self, kind) > 0 for kind in (*self.KINDS, *self.CHEATS))
                or self.black_hole or self.hoard or self.declare_mops is not None)

    @property
    def cheats(self) -> bool:
        """Whether any result cheat has a chance."""
        return any(getattr(self, kind) > 0 for kind in self.CHEATS)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"drop_socket=0.05,stall=0.02,negate=0.1,cheat_after=5"``: probabilities by fault or cheat kind, and
        optionally ``stall_s``, ``late_s`` (seconds), ``seed``, ``cheat_after`` (a count), ``black_hole`` and
        ``hoard`` (0 or 1) and ``declare_mops`` (a whole number). Raises ValueError with a readable message."""
        known = (*cls.KINDS, *cls.CHEATS, "stall_s", "late_s", "seed", "cheat_after", "black_hole", "hoard",
                 "declare_mops")
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or not name or not raw:
                raise ValueError(f"bad fault {item!r}: expected name=value, e.g. drop_socket=0.05")
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(known)}")
            if name in values:
                raise ValueError(f"fault {name!r} given twice")
            try:
                values[name] = cls.READERS.get(name, _probability)(raw)
            except ValueError as exc:
                raise ValueError(f"fault {name}={raw!r}: {exc}") from None
        return cls(**values)

    def draw(self, rng: random.Random) -> set[str]:
        """The faults of one lease: one draw per kind, always all of them (so a seed gives the same sequence
        whatever the probabilities)."""
        draws = [(kind, rng.random()) for kind in self.KINDS]
        return {kind for kind, x in draws if x < getattr(self, kind)}

    def draw_cheat(self, rng: random.Random) -> str | None:
        """The cheat of one result, or None: one draw, always, against the cheats' cumulative probabilities."""
        x = rng.random()
        for kind in self.CHEATS:
            x -= getattr(self, kind)
            if x < 0:
                return kind
        return None


@dataclasses.dataclass
class AgentStats:
    """Counters over the agent's lifetime, for tests and benchmarks."""

    units_done: int = 0  # results sent (a duplicated one once)
    texts_done: int = 0
    results_accepted: int = 0
    results_rejected: int = 0
    withdrawn: int = 0  # units the gateway took back while the car held them
    released: int = 0  # units the car gave back
    reconnects: int = 0  # connections established after the first
    resumed: int = 0  # leases carried from a lost connection into a new session's hello
    malformed: int = 0  # server messages ignored as invalid
    acks: int = 0  # telemetry acknowledgements received
    ack_timeouts: int = 0  # connections closed because the gateway stopped acknowledging telemetry
    faults_injected: dict[str, int] = dataclasses.field(default_factory=dict)  # by Faults kind


@dataclasses.dataclass(eq=False)
class _Lease:
    """A lease the car holds, from its unit.assign until the result is sent, or the lease is released or
    withdrawn. Leases belong to the agent, not to one connection, so they survive a reconnect."""

    unit_id: int
    epoch: int
    runtime: str
    precision: str
    texts: list
    lease_ttl_s: int
    task: str = "embedding"  # the workload (fleet.agent.workloads)
    params: dict = dataclasses.field(default_factory=dict)
    inputs_url: str = ""  # where its inputs are, if not in ``texts`` (fetched by the worker before computing)
    faults: set[str] = dataclasses.field(default_factory=set)  # injected faults still to happen
    cheat: str | None = None  # the cheat its computed result carries (Faults.CHEATS), counted when sent
    result: str | None = None  # the encoded result message, once computed
    send_at: float = 0.0  # loop time before which the result is held back (the late and stall faults)
    stalled: bool = False  # sitting on the result: no heartbeats, withdrawals ignored (the stall fault)
    release_reason: str | None = None  # to be given back at the next chance (computing failed, too large)

    @property
    def key(self) -> tuple[int, int]:
        return (self.unit_id, self.epoch)


class CarAgent:
    """One car's connection to the gateway: hello, telemetry, heartbeats and the work loop, reconnecting
    with exponential backoff and full jitter until ``stop`` is set.

    The car holds at most the welcome's ``max_inflight`` leases (or ``max_units``, a local cap, if lower).
    Held leases and results computed but not yet sent belong to the agent rather than to one connection:
    after a lost connection the agent reconnects, lists every held lease in its hello, sends the finished
    results once welcomed, and keeps computing the others; the gateway withdraws leases that are no longer
    current and refuses stale results. On ``stop`` the agent releases what it holds and closes with 1000.

    Telemetry carries an increasing ``seq`` that the gateway acknowledges; when no acknowledgement comes for
    ``ack_timeout_s`` (default: max(3 heartbeats, 15 s)) the gateway is taken as hung and the agent closes
    the connection, so the reconnect loop takes over.
    """

    def __init__(
        self,
        server_url: str,
        token: str,
        *,
        sensors: Sensors,
        runtimes: list[str] | None = None,
        executor: concurrent.futures.Executor | None = None,
        name: str = "car",
        telemetry_interval_s: float = 5.0,
        max_backoff_s: float = 30.0,
        throughput_mops: dict | None = None,
        watts: float = 100,
        max_units: int | None = None,
        ack_timeout_s: float | None = None,
        faults: Faults | None = None,
        on_connect: Callable[[protocol.Welcome], None] | None = None,
    ):
        self.url = websocket_url(server_url)
        self.server_url = server_url.rstrip("/")
        self.token = token
        self.sensors = sensors
        self.runtimes = list(runtimes) if runtimes is not None else installed_runtimes()
        unknown = [r for r in self.runtimes if r not in MODELS]
        if unknown:
            raise ValueError(f"unknown runtimes {unknown}; this agent has {sorted(MODELS)}")
        if max_units is not None and max_units < 1:
            raise ValueError("max_units must be 1 or more (or None for the gateway's max_inflight)")
        self.executor = executor or default_executor()
        self.name = name
        self.telemetry_interval_s = telemetry_interval_s
        self.max_backoff_s = max_backoff_s
        self.throughput_mops = {p: int(v) for p, v in throughput_mops.items()} if throughput_mops is not None else None
        self.watts = watts
        self.max_units = max_units
        self.ack_timeout_s = ack_timeout_s
        self.faults = faults if faults is not None and faults.enabled else None
        self.black_hole = self.faults is not None and self.faults.black_hole
        self.hoard = self.faults is not None and self.faults.hoard
        if self.faults is not None and self.faults.declare_mops is not None:
            precisions = dict.fromkeys(p for runtime in self.runtimes for p in MODELS[runtime].precisions)
            self.throughput_mops = {p: self.faults.declare_mops for p in precisions}
        self.on_connect = on_connect
        self.vehicle_id: int | None = None
        self.stats = AgentStats()
        # Held leases in lease order (the order they are computed and their results sent).
        self.held: dict[tuple[int, int], _Lease] = {}
        self._work: asyncio.Queue[_Lease] = asyncio.Queue()  # leases for the worker
        self._outbox = asyncio.Event()  # a result (or a release) is ready for the session to send
        self._telemetry_seq = 0
        self._fault_rng = random.Random(self.faults.seed) if self.faults is not None else None
        # Cheats draw from a stream of their own, so that they do not shift the faults' draws.
        cheat_seed = None if self.faults is None or self.faults.seed is None else f"cheats/{self.faults.seed}"
        self._cheat_rng = random.Random(cheat_seed)
        self._earlier: dict[str, tuple[int, np.ndarray | list]] = {}  # runtime -> (unit_id, true output), for replay

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set. Raises :class:`AuthRefused` or :class:`Replaced`, both final."""
        loop = asyncio.get_running_loop()
        if self.throughput_mops is None:
            self.throughput_mops = await loop.run_in_executor(self.executor, measure_mops, self.runtimes)
            logger.info("%s: measured throughput %s Mops/s", self.name, self.throughput_mops)
        worker = asyncio.create_task(self._worker())
        try:
            await self._connect_loop(stop)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        connected_before = False
        while not stop.is_set():
            try:
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    max_size=MAX_FRAME_BYTES,
                    open_timeout=10,
                ) as ws:
                    if connected_before:
                        self.stats.reconnects += 1
                    connected_before = True
                    session = _Session(self, ws)
                    try:
                        await session.run(stop)
                    except ConnectionClosed:
                        pass  # closed while sending the hello: handled below like any close
                    if session.welcomed.is_set():
                        failures = 0
                    if stop.is_set():
                        await session.shutdown()
                        logger.info("%s: stopped", self.name)
                        return
                    self._check_final_close(ws)
                    logger.warning("%s: connection lost (code %s %s)", self.name, ws.close_code, ws.close_reason)
            except InvalidStatus as exc:
                if exc.response.status_code == 403:
                    logger.error("%s: the gateway refused the token (HTTP 403); not retrying", self.name)
                    raise AuthRefused("the gateway refused the token (HTTP 403)") from None
                logger.warning("%s: handshake failed: HTTP %s", self.name, exc.response.status_code)
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                logger.warning("%s: cannot connect to %s: %s", self.name, self.url, exc or type(exc).__name__)
            delay = random.uniform(0, min(self.max_backoff_s, BACKOFF_BASE_S * 2**failures))
            failures += 1
            logger.info("%s: reconnecting in %.1f s (holding %d leases)", self.name, delay, len(self.held))
            await wait_event(stop, delay)

    def _check_final_close(self, ws: ClientConnection) -> None:
        if ws.close_code == protocol.CLOSE_TOKEN_REVOKED:
            logger.error("%s: token revoked by the gateway; not retrying", self.name)
            raise AuthRefused("the token was revoked")
        if ws.close_code == protocol.CLOSE_REPLACED:
            logger.error("%s: another agent connected with this token; not retrying", self.name)
            raise Replaced("another agent connected with this token")

    # --- leases and work (independent of the connection) ------------------------------------------------

    def _hold(self, lease: _Lease) -> None:
        if self.faults is not None:
            lease.faults = self.faults.draw(self._fault_rng)
        self.held[lease.key] = lease
        if self.hoard:
            self._injected("hoard", lease)
            return  # never computed, so never sent
        self._work.put_nowait(lease)

    def _holds(self, lease: _Lease) -> bool:
        return self.held.get(lease.key) is lease

    def _injected(self, kind: str, lease: _Lease | None = None) -> None:
        self.stats.faults_injected[kind] = self.stats.faults_injected.get(kind, 0) + 1
        if lease is None:
            logger.info("%s: injecting %s", self.name, kind)
        else:
            logger.info("%s: injecting fault %s on unit %s", self.name, kind, lease.unit_id)

    def _cheat_for(self, lease: _Lease) -> str | None:
        """The cheat the result of ``lease`` gets (None: honest), decided as the worker computes it."""
        faults = self.faults
        if faults is None or not faults.cheats:
            return None
        made = self.stats.units_done + sum(1 for held in self.held.values() if held.result is not None)
        if made < faults.cheat_after:
            return None
        kind = faults.draw_cheat(self._cheat_rng)
        if kind is None or not cheat_applies(kind, lease.texts, runtime_kind=MODELS[lease.runtime].kind):
            return None
        if kind == "replay":
            earlier = self._earlier.get(lease.runtime)
            if earlier is None or earlier[0] == lease.unit_id:
                return "random_vectors"  # nothing of another unit to replay yet
        return kind

    async def _worker(self) -> None:
        """Computes held units one at a time, in lease order, connected or not; sessions send the results."""
        loop = asyncio.get_running_loop()
        while True:
            lease = await self._work.get()
            while self._holds(lease) and self.sensors.driving:
                await asyncio.sleep(SENSOR_POLL_S)  # no inference while driving; the session releases the lease
            if not self._holds(lease):
                continue  # withdrawn or released while queued
            if lease.inputs_url and not lease.texts:
                try:
                    lease.texts = await loop.run_in_executor(
                        self.executor, fetch_inputs, self.server_url + lease.inputs_url, self.token)
                except InputsUnavailable as exc:
                    logger.warning("%s: inputs of unit %s: %s", self.name, lease.unit_id, exc)
                    lease.release_reason = "inputs_unavailable"
                    self._outbox.set()
                    continue
                if not self._holds(lease):
                    continue
            cheat = self._cheat_for(lease)
            compute = functools.partial(
                _compute, lease.task, lease.params, lease.runtime, lease.precision, lease.texts, cheat,
                earlier=self._earlier[lease.runtime][1] if cheat == "replay" else None,
                noise_seed=self._cheat_rng.getrandbits(64) if cheat == "random_vectors" else None,
            )
            # Busy time, submission to result: on a car the unit has the computer to itself; in the simulator,
            # cars sharing the CPU each stand for a slower computer working all that time.
            started = loop.time()
            try:
                items, honest = await loop.run_in_executor(self.executor, compute)
            except Exception:
                logger.exception("%s: computing unit %s failed", self.name, lease.unit_id)
                lease.release_reason = "compute_failed"
                self._outbox.set()
                continue
            self.sensors.on_work(loop.time() - started, self.watts)
            if honest is not None and len(honest) and self.faults is not None and self.faults.replay > 0:
                self._earlier[lease.runtime] = (lease.unit_id, honest)
            lease.cheat = cheat
            if not self._holds(lease):
                logger.debug("%s: discarding result of unit %s (no longer held)", self.name, lease.unit_id)
                continue
            if "corrupt" in lease.faults:
                items = _corrupt(lease.task, items)
                self._injected("corrupt", lease)
            text = _encode(protocol.Result(unit_id=lease.unit_id, epoch=lease.epoch, **(
                {"embeddings_b64": items} if lease.task == "embedding" else {"outputs": items})))
            if len(text) > protocol.MAX_MESSAGE_BYTES:
                logger.error("%s: result of unit %s exceeds the message limit", self.name, lease.unit_id)
                lease.release_reason = "result_too_large"
            else:
                lease.result, lease.send_at = text, loop.time()
                if "late" in lease.faults:
                    lease.send_at += self.faults.late_s
                    self._injected("late", lease)
                if "stall" in lease.faults:
                    stall_s = self.faults.stall_s if self.faults.stall_s is not None else lease.lease_ttl_s + STALL_MARGIN_S
                    lease.send_at = max(lease.send_at, loop.time() + stall_s)
                    lease.stalled = True
                    self._injected("stall", lease)
            self._outbox.set()


class _Session:
    """State of one websocket connection. The leases live on the agent and outlast it."""

    def __init__(self, agent: CarAgent, ws: ClientConnection):
        self.agent = agent
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.welcomed = asyncio.Event()
        self.wake = asyncio.Event()  # something changed that may allow a work request
        self.send_lock = asyncio.Lock()
        self.heartbeat_s = 0.0
        self.max_inflight = 0  # from the welcome
        self.request_sent_at: float | None = None
        self.retry_at = 0.0
        self.driving = agent.sensors.driving
        self.unacked: dict[int, float] = {}  # telemetry seq -> loop time sent, until acknowledged

    @property
    def capacity(self) -> int:
        """The most leases the car may hold: the gateway's ``max_inflight``, or the agent's lower local cap."""
        if self.agent.max_units is None:
            return self.max_inflight
        return min(self.max_inflight, self.agent.max_units)

    @property
    def ack_timeout_s(self) -> float:
        if self.agent.ack_timeout_s is not None:
            return self.agent.ack_timeout_s
        return max(ACK_TIMEOUT_HEARTBEATS * self.heartbeat_s, ACK_TIMEOUT_MIN_S)

    async def run(self, stop: asyncio.Event) -> None:
        """Until the connection ends, a task fails, or ``stop`` is set."""
        agent = self.agent
        if agent.held:
            agent.stats.resumed += len(agent.held)
            logger.info("%s: resuming %d leases", agent.name, len(agent.held))
        uplink = getattr(agent.sensors, "uplink_kbps", None)
        if agent.faults is not None and agent.faults.declare_mops is not None:
            agent._injected("declare_mops")
        await self.send(
            protocol.Hello(
                agent_version=AGENT_VERSION,
                runtimes=agent.runtimes,
                throughput_mops=agent.throughput_mops,
                uplink_kbps=int(uplink) if uplink else None,
                leases=tuple(agent.held),
                tasks=list(WORKLOAD_RUNTIMES),
            )
        )
        tasks = [
            asyncio.create_task(coro)
            for coro in (stop.wait(), self._reader(), self._ticker(), self._requester(), self._sender())
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, ConnectionClosed):
                logger.error("%s: session failed", agent.name, exc_info=exc)

    async def shutdown(self) -> None:
        """Clean stop: give back every held lease (a hoarder keeps them), then close with 1000."""
        try:
            for lease in list(self.agent.held.values()) if not self.agent.hoard else []:
                await self._release(lease, "shutdown")
            await self.ws.close(1000, "agent stopping")
        except ConnectionClosed:
            pass

    async def send(self, msg: protocol.Message | str) -> None:
        """Send a message (or its already encoded text)."""
        text = msg if isinstance(msg, str) else _encode(msg)
        async with self.send_lock:
            await self.ws.send(text)

    # --- incoming -------------------------------------------------------------------------------------

    async def _reader(self) -> None:
        async for raw in self.ws:
            try:
                if not isinstance(raw, str):
                    raise protocol.ProtocolError("bad_message", "binary frames are not part of the protocol")
                msg = protocol.parse(protocol.decode(raw), protocol.SERVER_MESSAGES)
            except protocol.ProtocolError as exc:
                self.agent.stats.malformed += 1
                logger.warning("%s: ignoring malformed server message (%s): %s", self.agent.name, exc.code, exc.message)
                continue
            await self._handle(msg)

    async def _handle(self, msg: protocol.Message) -> None:
        agent, name = self.agent, self.agent.name
        match msg:
            case protocol.Welcome():
                agent.vehicle_id = msg.vehicle_id
                self.heartbeat_s = max(1, msg.heartbeat_s)
                self.max_inflight = msg.max_inflight
                self.welcomed.set()
                logger.info("%s: connected as vehicle %s (up to %d leases)", name, msg.vehicle_id, self.capacity)
                if agent.on_connect is not None:
                    agent.on_connect(msg)
            case protocol.UnitAssign():
                # One request may be answered by a batch of assignments, sent back to back: the request is
                # answered, and the next one waits a moment for the rest of the batch, if the car has room for
                # more (a full car gets no more: it asks again as soon as a result frees a place).
                self.request_sent_at = None
                await self._accept(msg)
                if len(self.agent.held) < self.capacity:
                    self.retry_at = max(self.retry_at, self.loop.time() + BATCH_SETTLE_S)
            case protocol.NoWork():
                self.request_sent_at = None
                self.retry_at = self.loop.time() + msg.retry_after_s * random.uniform(1.0, 1.2)
                logger.debug("%s: no work (%s), asking again in %.1f s", name, msg.reason, msg.retry_after_s)
            case protocol.UnitWithdraw():
                lease = agent.held.get((msg.unit_id, msg.epoch))
                if lease is not None and lease.stalled:
                    logger.info("%s: fault stall: ignoring the withdrawal of unit %s", name, msg.unit_id)
                elif lease is not None:
                    del agent.held[lease.key]
                    agent.stats.withdrawn += 1
                    logger.info("%s: unit %s withdrawn (%s)", name, msg.unit_id, msg.reason)
            case protocol.ResultAck():
                if msg.accepted:
                    agent.stats.results_accepted += 1
                else:
                    agent.stats.results_rejected += 1
                    logger.warning("%s: result for unit %s rejected: %s", name, msg.unit_id, msg.reason)
            case protocol.Ack():
                agent.stats.acks += 1
                for seq in [seq for seq in self.unacked if seq <= msg.seq]:
                    del self.unacked[seq]
            case protocol.Error():
                logger.warning("%s: gateway error %s: %s", name, msg.code, msg.message)
                if self.request_sent_at is not None:
                    self.request_sent_at = None
                    self.retry_at = self.loop.time() + ERROR_RETRY_S
        self.wake.set()

    async def _accept(self, msg: protocol.UnitAssign) -> None:
        agent = self.agent
        lease = _Lease(msg.unit_id, msg.epoch, msg.runtime, msg.precision, list(msg.texts), msg.lease_ttl_s,
                       task=msg.task, params=msg.params, inputs_url=msg.inputs_url)
        spec = MODELS.get(msg.runtime)
        if lease.key in agent.held:
            logger.debug("%s: unit %s epoch %s is already held", agent.name, lease.unit_id, lease.epoch)
        elif (msg.runtime not in agent.runtimes or spec is None or msg.precision not in spec.precisions
              or msg.task not in WORKLOAD_RUNTIMES):
            await self._release(lease, "unsupported")
        elif self.driving:
            await self._release(lease, "driving")
        elif len(agent.held) >= self.capacity:
            await self._release(lease, "over_capacity")
        else:
            agent._hold(lease)
            logger.debug("%s: leased unit %s epoch %s (%d texts)", agent.name, lease.unit_id, lease.epoch, len(lease.texts))

    async def _release(self, lease: _Lease, reason: str) -> None:
        agent = self.agent
        if agent._holds(lease):
            del agent.held[lease.key]
        agent.stats.released += 1
        logger.info("%s: releasing unit %s (%s)", agent.name, lease.unit_id, reason)
        await self.send(protocol.Release(unit_id=lease.unit_id, epoch=lease.epoch, reason=reason))

    # --- periodic: telemetry, heartbeats, sensor changes --------------------------------------------

    def _telemetry(self) -> protocol.Telemetry:
        sensors = self.agent.sensors
        return protocol.Telemetry(
            battery_pct=min(100.0, max(0.0, float(sensors.battery_pct))),
            driving=bool(sensors.driving),
            plugged_in=bool(sensors.plugged_in),
            on_wifi=bool(sensors.on_wifi),
            charging_kw=float(getattr(sensors, "charging_kw", 0.0)),
            temp_c=getattr(sensors, "temp_c", None),
        )

    async def _ticker(self) -> None:
        """Telemetry (numbered, and watched for acknowledgements), heartbeats, and the reaction to driving.
        Returns after closing a connection whose gateway stopped acknowledging telemetry."""
        agent = self.agent
        last: protocol.Telemetry | None = None
        last_sent = last_heartbeat = self.loop.time()
        while True:
            now = self.loop.time()
            reading = self._telemetry()
            changed = last is None or (reading.driving, reading.plugged_in, reading.on_wifi) != (
                last.driving, last.plugged_in, last.on_wifi
            )
            if reading.driving != self.driving:
                self.driving = reading.driving
                logger.info("%s: %s", agent.name, "driving" if self.driving else "parked")
                self.wake.set()
            if self.driving and agent.held and not agent.hoard:  # also leases carried into this session while driving
                for lease in list(agent.held.values()):
                    await self._release(lease, "driving")
            if changed or now - last_sent >= agent.telemetry_interval_s:
                agent._telemetry_seq += 1
                await self.send(dataclasses.replace(reading, seq=agent._telemetry_seq))
                self.unacked[agent._telemetry_seq] = now
                last, last_sent = reading, now
            if self.unacked and now - next(iter(self.unacked.values())) >= self.ack_timeout_s:
                agent.stats.ack_timeouts += 1
                logger.warning(
                    "%s: telemetry %d not acknowledged within %.0f s; the gateway seems hung, reconnecting",
                    agent.name, next(iter(self.unacked)), self.ack_timeout_s,
                )
                await self.ws.close(1011, "telemetry not acknowledged")
                return
            if not self.welcomed.is_set():
                last_heartbeat = now
            elif now - last_heartbeat >= self.heartbeat_s and not any(lease.stalled for lease in agent.held.values()):
                await self.send(protocol.Heartbeat(leases=[list(key) for key in agent.held]))
                last_heartbeat = now
            await asyncio.sleep(SENSOR_POLL_S)

    # --- work -----------------------------------------------------------------------------------------

    async def _requester(self) -> None:
        """Asks for work whenever the car holds fewer leases than its capacity and may work."""
        agent = self.agent
        await self.welcomed.wait()
        if agent.black_hole:
            agent._injected("black_hole")
            await asyncio.Event().wait()  # asks for nothing, ever (cancelled with the session)
        while True:
            self.wake.clear()
            now = self.loop.time()
            if self.request_sent_at is not None and now - self.request_sent_at >= REQUEST_TIMEOUT_S:
                logger.warning("%s: work request unanswered, asking again", agent.name)
                self.request_sent_at = None
            if (
                self.request_sent_at is None
                and not self.driving
                and len(agent.held) < self.capacity
                and now >= self.retry_at
            ):
                self.request_sent_at = now
                await self.send(protocol.WorkRequest())
            if self.request_sent_at is not None:
                timeout = self.request_sent_at + REQUEST_TIMEOUT_S - now
            elif self.retry_at > now:
                timeout = self.retry_at - now
            else:
                timeout = None  # waiting for capacity or for driving to end
            await wait_event(self.wake, timeout)

    async def _sender(self) -> None:
        """Once welcomed, sends the results the worker finished (including those of an earlier connection) and
        the releases it decided on, in lease order. Returns after dropping the connection on purpose."""
        agent = self.agent
        await self.welcomed.wait()
        while True:
            agent._outbox.clear()
            now = self.loop.time()
            next_at: float | None = None
            for lease in list(agent.held.values()):
                if not agent._holds(lease):
                    continue
                if lease.release_reason is not None:
                    await self._release(lease, lease.release_reason)
                elif lease.result is None:
                    continue
                elif lease.send_at > now:
                    next_at = lease.send_at if next_at is None else min(next_at, lease.send_at)
                elif not await self._send_result(lease):
                    return
            await wait_event(agent._outbox, None if next_at is None else next_at - now)

    async def _send_result(self, lease: _Lease) -> bool:
        """Send a finished result; False if the drop_socket fault aborted the connection instead."""
        agent = self.agent
        if "drop_socket" in lease.faults:
            lease.faults.discard("drop_socket")  # once: the next session sends the result
            agent._injected("drop_socket", lease)
            self.ws.transport.abort()  # no close frame, no release: as if the network vanished
            return False
        await self.send(lease.result)
        if lease.cheat is not None:
            agent._injected(lease.cheat, lease)
        if "duplicate" in lease.faults:
            lease.faults.discard("duplicate")
            agent._injected("duplicate", lease)
            await self.send(lease.result)
        if agent._holds(lease):
            del agent.held[lease.key]
        if lease.stalled:
            logger.info("%s: sent the stalled result of unit %s late", agent.name, lease.unit_id)
        agent.stats.units_done += 1
        agent.stats.texts_done += len(lease.texts)
        self.wake.set()
        return True


def _encode(msg: protocol.Message) -> str:
    return json.dumps(protocol.dump(msg), separators=(",", ":"))


def _infer(runtime: str, precision: str, inputs: list[str]) -> np.ndarray | list:
    """Runs in the executor."""
    return get_runner(runtime, precision).infer(inputs)


def _compute(task: str, params: dict, runtime: str, precision: str, texts: list[str], cheat: str | None, *,
             earlier: np.ndarray | list | None, noise_seed: int | None) -> tuple[list, np.ndarray | list | None]:
    """A unit's result (its workload's items, fleet.agent.workloads) under ``cheat`` (None: honest), and the
    runtime's true output computed on the way, if any (embeddings, page readings). A cheat replaces the model the
    workload runs on: its result is wrong in the same way. Runs in the executor."""
    rng = np.random.default_rng(noise_seed) if noise_seed is not None else None
    honest: list = [None]
    spec = MODELS[runtime]

    def infer(batch: list[str]):
        if spec.kind == "ocr":
            rows, honest[0] = cheat_read(cheat, batch, read=functools.partial(_infer, runtime, precision),
                                         read_cheap=get_runner(runtime, precision).read_scaled, rng=rng,
                                         earlier=earlier)
        else:
            rows, honest[0] = cheat_embed(cheat, batch, embed=functools.partial(_infer, runtime, precision),
                                          dims=spec.dims, rng=rng, earlier=earlier)
        return rows

    return workload_compute(task, texts, params, infer), honest[0]


def first_words(text: str, count: int = FIRST_WORDS) -> str:
    """The first ``count`` whitespace-separated words of ``text``, or the text itself if it has no more."""
    words = text.split()
    return text if len(words) <= count else " ".join(words[:count])


def cheat_applies(kind: str, texts: list[str], *, runtime_kind: str = "encoder") -> bool:
    """Whether the cheat ``kind`` can change the result of a unit of ``texts`` (else it is the honest one)."""
    if not texts:
        return False
    if kind in ("one_vector", "rotate_rows"):
        return len(texts) > 1
    if kind == "first_words" and runtime_kind == "encoder":
        return any(first_words(text) != text for text in texts)
    return True


def random_unit_vectors(rows: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` random float32 vectors of unit length, uniform on the sphere."""
    vectors = rng.standard_normal((rows, dims))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def cheat_embed(kind: str | None, texts: list[str], *, embed: Callable[[list[str]], np.ndarray], dims: int,
                rng: np.random.Generator | None = None,
                earlier: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The vectors a car sends for ``texts`` under the result cheat ``kind`` (None: the honest result; see
    Faults), and the true embeddings of ``texts`` when they were computed on the way (else None).

    ``embed`` computes true embeddings (texts -> float32 [len(texts), dims]); ``rng`` draws the random
    vectors (default: a fresh unseeded one); ``earlier`` is another unit's true embeddings, which ``replay``
    sends."""
    count = len(texts)
    match kind:
        case None:
            honest = embed(texts)
            return honest, honest
        case "random_vectors":
            return random_unit_vectors(count, dims, rng if rng is not None else np.random.default_rng()), None
        case "one_vector":
            return np.repeat(embed(texts[:1]), count, axis=0), None
        case "rotate_rows":
            honest = embed(texts)
            return np.roll(honest, -1, axis=0), honest
        case "negate":
            honest = embed(texts)
            return -honest, honest
        case "replay":
            if earlier is None or not len(earlier):
                raise ValueError("replay needs an earlier unit's embeddings")
            return np.array(earlier[np.arange(count) % len(earlier)], dtype=np.float32), None
        case "first_words":
            return embed([first_words(text) for text in texts]), None
    raise ValueError(f"unknown cheat {kind!r}; known: {', '.join(Faults.CHEATS)}")


#: The ``first_words`` cheat on OCR reads each page shrunk to this share of its width and height.
CHEAP_SCALE = 0.5


def random_readings(count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` page readings of random lowercase words: what a car sends that reads nothing."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    pages = []
    for _ in range(count):
        lines = []
        for row in range(int(rng.integers(1, 6))):
            words = [''.join(rng.choice(letters, int(rng.integers(2, 9)))) for _ in range(int(rng.integers(3, 10)))]
            lines.append({"text": " ".join(words), "box": [50, 50 + 46 * row, 900, 80 + 46 * row], "score": 0.99})
        pages.append({"text": "\n".join(line["text"] for line in lines), "lines": lines})
    return pages


def cheat_read(kind: str | None, images: list[str], *, read: Callable[[list[str]], list],
               read_cheap: Callable[[list[str], float], list], rng: np.random.Generator | None = None,
               earlier: list | None = None) -> tuple[list, list | None]:
    """The page readings a car sends for ``images`` under the result cheat ``kind`` (None: honest; the cheats
    of Faults, each in OCR's terms), and the true readings when they were computed on the way (else None).
    ``random_vectors``: random words; ``one_vector``: the first page's reading for every page; ``rotate_rows``:
    each page gets the next one's; ``negate``: every line's text backwards; ``replay``: an earlier unit's
    readings; ``first_words``: each page read at CHEAP_SCALE of its size (cheaper, and close)."""
    count = len(images)
    match kind:
        case None:
            honest = read(images)
            return honest, honest
        case "random_vectors":
            return random_readings(count, rng if rng is not None else np.random.default_rng()), None
        case "one_vector":
            return read(images[:1]) * count, None
        case "rotate_rows":
            honest = read(images)
            return honest[1:] + honest[:1], honest
        case "negate":
            honest = read(images)
            backwards = [{"text": "\n".join(line["text"][::-1] for line in page["lines"]),
                          "lines": [{**line, "text": line["text"][::-1]} for line in page["lines"]]} for page in honest]
            return backwards, honest
        case "replay":
            if not earlier:
                raise ValueError("replay needs an earlier unit's readings")
            return [earlier[i % len(earlier)] for i in range(count)], None
        case "first_words":
            return read_cheap(images, CHEAP_SCALE), None
    raise ValueError(f"unknown cheat {kind!r}; known: {', '.join(Faults.CHEATS)}")


def _corrupt(task: str, items: list) -> list:
    """The corrupt fault: for embeddings the first vector at twice unit length, or one vector too many if there
    is none; for another workload, one item too many."""
    if task != "embedding":
        return items + (items[:1] or [None])
    bad = np.array([decode_embedding(item) for item in items], dtype=np.float32)
    if len(bad):
        bad[0] *= 2
        return encode_embeddings(bad)
    return encode_embeddings(np.ones((1, 1), dtype=np.float32))
