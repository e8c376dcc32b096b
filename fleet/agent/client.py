"""The car's agent: pairs with the marketplace, then keeps a websocket session with the gateway and
computes the work units it leases (see fleet.protocol and docs/vehicle-protocol.md).

No Django here: this module runs on the car (or in the fleet simulator, fleet.agent.sim).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from fleet import protocol
from fleet.agent.models import MODELS, get_runner, measure_throughput

logger = logging.getLogger("fleet.agent")

AGENT_VERSION = "1.0.0"
#: How often sensors are polled for changes that are reported at once (driving starts or stops...).
SENSOR_POLL_S = 0.25
#: A work request unanswered this long is considered lost and may be sent again.
REQUEST_TIMEOUT_S = 30.0
#: Pause before asking for work again after the gateway answered with an Error.
ERROR_RETRY_S = 5.0
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


def websocket_url(server_url: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/ws/vehicle/``."""
    parts = urllib.parse.urlsplit(server_url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes:
        raise ValueError(f"server URL must be http(s)://..., got {server_url!r}")
    return urllib.parse.urlunsplit((schemes[parts.scheme], parts.netloc, parts.path.rstrip("/") + "/ws/vehicle/", "", ""))


def encode_embeddings(vectors: np.ndarray) -> list[str]:
    """One base64 string of little-endian float32 values per row."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def decode_embedding(b64: str) -> np.ndarray:
    """Inverse of :func:`encode_embeddings` for one row."""
    return np.frombuffer(base64.b64decode(b64, validate=True), dtype="<f4")


def measure_mops(runtimes: list[str], seconds: float = 1.0) -> dict[str, int]:
    """Measured mega-ops/s per precision on this machine (blocking: about ``seconds`` per runtime and
    precision). With several runtimes a precision gets the slowest one's figure."""
    mops: dict[str, int] = {}
    for slug in runtimes:
        spec = MODELS[slug]
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
    """What the agent reads from the car; on a real car these come from the vehicle bus."""

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

    def on_work(self, seconds: float, watts: float) -> None:
        """Static readings: nothing drains."""


@dataclasses.dataclass
class AgentStats:
    """Counters over the agent's lifetime, for tests and benchmarks."""

    units_done: int = 0  # results sent
    texts_done: int = 0
    results_accepted: int = 0
    results_rejected: int = 0
    withdrawn: int = 0  # units the gateway took back while the car held them
    released: int = 0  # units the car gave back
    reconnects: int = 0  # connections established after the first
    malformed: int = 0  # server messages ignored as invalid


@dataclasses.dataclass
class _Lease:
    unit_id: int
    epoch: int
    runtime: str
    precision: str
    texts: list

    @property
    def key(self) -> tuple[int, int]:
        return (self.unit_id, self.epoch)


class CarAgent:
    """One car's connection to the gateway: hello, telemetry, heartbeats and the work loop, reconnecting
    with exponential backoff and full jitter until ``stop`` is set."""

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
        max_units: int = 2,
        on_connect: Callable[[protocol.Welcome], None] | None = None,
    ):
        self.url = websocket_url(server_url)
        self.token = token
        self.sensors = sensors
        self.runtimes = list(runtimes) if runtimes is not None else list(MODELS)
        unknown = [r for r in self.runtimes if r not in MODELS]
        if unknown:
            raise ValueError(f"unknown runtimes {unknown}; this agent has {sorted(MODELS)}")
        self.executor = executor or default_executor()
        self.name = name
        self.telemetry_interval_s = telemetry_interval_s
        self.max_backoff_s = max_backoff_s
        self.throughput_mops = {p: int(v) for p, v in throughput_mops.items()} if throughput_mops is not None else None
        self.watts = watts
        self.max_units = max_units
        self.on_connect = on_connect
        self.vehicle_id: int | None = None
        self.stats = AgentStats()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set. Raises :class:`AuthRefused` or :class:`Replaced`, both final."""
        loop = asyncio.get_running_loop()
        if self.throughput_mops is None:
            self.throughput_mops = await loop.run_in_executor(self.executor, measure_mops, self.runtimes)
            logger.info("%s: measured throughput %s Mops/s", self.name, self.throughput_mops)
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
                        await ws.close(1000, "agent stopping")
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
            logger.info("%s: reconnecting in %.1f s", self.name, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass

    def _check_final_close(self, ws: ClientConnection) -> None:
        if ws.close_code == protocol.CLOSE_TOKEN_REVOKED:
            logger.error("%s: token revoked by the gateway; not retrying", self.name)
            raise AuthRefused("the token was revoked")
        if ws.close_code == protocol.CLOSE_REPLACED:
            logger.error("%s: another agent connected with this token; not retrying", self.name)
            raise Replaced("another agent connected with this token")


class _Session:
    """State of one websocket connection; leases do not survive it (the gateway requeues them)."""

    def __init__(self, agent: CarAgent, ws: ClientConnection):
        self.agent = agent
        self.ws = ws
        self.loop = asyncio.get_running_loop()
        self.welcomed = asyncio.Event()
        self.wake = asyncio.Event()  # something changed that may allow a work request
        self.send_lock = asyncio.Lock()
        self.held: dict[tuple[int, int], _Lease] = {}
        self.queue: asyncio.Queue[_Lease] = asyncio.Queue()
        self.heartbeat_s = 0.0
        self.request_sent_at: float | None = None
        self.retry_at = 0.0
        self.driving = agent.sensors.driving

    async def run(self, stop: asyncio.Event) -> None:
        """Until the connection ends, a task fails, or ``stop`` is set."""
        await self.send(
            protocol.Hello(
                agent_version=AGENT_VERSION, runtimes=self.agent.runtimes, throughput_mops=self.agent.throughput_mops
            )
        )
        tasks = [
            asyncio.create_task(coro)
            for coro in (stop.wait(), self._reader(), self._ticker(), self._worker(), self._requester())
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
                logger.error("%s: session failed", self.agent.name, exc_info=exc)

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
        name = self.agent.name
        match msg:
            case protocol.Welcome():
                self.agent.vehicle_id = msg.vehicle_id
                self.heartbeat_s = max(1, msg.heartbeat_s)
                self.welcomed.set()
                logger.info("%s: connected as vehicle %s", name, msg.vehicle_id)
                if self.agent.on_connect is not None:
                    self.agent.on_connect(msg)
            case protocol.UnitAssign():
                self.request_sent_at = None
                await self._accept(msg)
            case protocol.NoWork():
                self.request_sent_at = None
                self.retry_at = self.loop.time() + msg.retry_after_s * random.uniform(1.0, 1.2)
                logger.debug("%s: no work (%s), asking again in %.1f s", name, msg.reason, msg.retry_after_s)
            case protocol.UnitWithdraw():
                if self.held.pop((msg.unit_id, msg.epoch), None) is not None:
                    self.agent.stats.withdrawn += 1
                    logger.info("%s: unit %s withdrawn (%s)", name, msg.unit_id, msg.reason)
            case protocol.ResultAck():
                if msg.accepted:
                    self.agent.stats.results_accepted += 1
                else:
                    self.agent.stats.results_rejected += 1
                    logger.warning("%s: result for unit %s rejected: %s", name, msg.unit_id, msg.reason)
            case protocol.Error():
                logger.warning("%s: gateway error %s: %s", name, msg.code, msg.message)
                if self.request_sent_at is not None:
                    self.request_sent_at = None
                    self.retry_at = self.loop.time() + ERROR_RETRY_S
        self.wake.set()

    async def _accept(self, msg: protocol.UnitAssign) -> None:
        lease = _Lease(msg.unit_id, msg.epoch, msg.runtime, msg.precision, list(msg.texts))
        spec = MODELS.get(msg.runtime)
        if msg.runtime not in self.agent.runtimes or spec is None or msg.precision not in spec.precisions:
            await self._release(lease, "unsupported")
        elif self.driving:
            await self._release(lease, "driving")
        elif len(self.held) >= self.agent.max_units:
            await self._release(lease, "over_capacity")
        else:
            self.held[lease.key] = lease
            self.queue.put_nowait(lease)
            logger.debug("%s: leased unit %s epoch %s (%d texts)", self.agent.name, lease.unit_id, lease.epoch, len(lease.texts))

    async def _release(self, lease: _Lease, reason: str) -> None:
        self.held.pop(lease.key, None)
        self.agent.stats.released += 1
        logger.info("%s: releasing unit %s (%s)", self.agent.name, lease.unit_id, reason)
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
                logger.info("%s: %s", self.agent.name, "driving" if self.driving else "parked")
                if self.driving:
                    for lease in list(self.held.values()):
                        await self._release(lease, "driving")
                self.wake.set()
            if changed or now - last_sent >= self.agent.telemetry_interval_s:
                await self.send(reading)
                last, last_sent = reading, now
            if not self.welcomed.is_set():
                last_heartbeat = now
            elif now - last_heartbeat >= self.heartbeat_s:
                await self.send(protocol.Heartbeat(leases=[list(key) for key in self.held]))
                last_heartbeat = now
            await asyncio.sleep(SENSOR_POLL_S)

    # --- work -----------------------------------------------------------------------------------------

    async def _requester(self) -> None:
        """Asks for work whenever the car holds fewer than ``max_units`` and may work."""
        await self.welcomed.wait()
        while True:
            self.wake.clear()
            now = self.loop.time()
            if self.request_sent_at is not None and now - self.request_sent_at >= REQUEST_TIMEOUT_S:
                logger.warning("%s: work request unanswered, asking again", self.agent.name)
                self.request_sent_at = None
            if (
                self.request_sent_at is None
                and not self.driving
                and len(self.held) < self.agent.max_units
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
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _worker(self) -> None:
        """Computes held units one at a time, in lease order."""
        agent = self.agent
        while True:
            lease = await self.queue.get()
            if self.held.get(lease.key) is not lease:
                continue  # withdrawn or released while queued
            # Busy time, submission to result: on a car the unit has the computer to itself; in the simulator,
            # cars sharing the CPU each stand for a slower computer working all that time.
            started = self.loop.time()
            try:
                vectors = await self.loop.run_in_executor(agent.executor, _embed, lease.runtime, lease.precision, lease.texts)
            except Exception:
                logger.exception("%s: computing unit %s failed", agent.name, lease.unit_id)
                if self.held.get(lease.key) is lease:
                    await self._release(lease, "compute_failed")
                continue
            agent.sensors.on_work(self.loop.time() - started, agent.watts)
            if self.held.get(lease.key) is not lease:
                logger.debug("%s: discarding result of unit %s (no longer held)", agent.name, lease.unit_id)
                continue
            text = _encode(
                protocol.Result(unit_id=lease.unit_id, epoch=lease.epoch, embeddings_b64=encode_embeddings(vectors))
            )
            if len(text) > protocol.MAX_MESSAGE_BYTES:
                logger.error("%s: result of unit %s exceeds the message limit", agent.name, lease.unit_id)
                await self._release(lease, "result_too_large")
                continue
            del self.held[lease.key]
            await self.send(text)
            agent.stats.units_done += 1
            agent.stats.texts_done += len(lease.texts)
            self.wake.set()


def _encode(msg: protocol.Message) -> str:
    return json.dumps(protocol.dump(msg), separators=(",", ":"))


def _embed(runtime: str, precision: str, texts: list[str]) -> np.ndarray:
    """Runs in the executor."""
    return get_runner(runtime, precision).embed(texts)
