"""Tests of the vehicle protocol, the agent's encoding, the agent itself against a small fake gateway
(a real websocket server on loopback, scripted by each test), and the simulated car: no Django, no database.

Run with ``pytest tests/fleet/test_agent_protocol.py -p no:django``.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import math
import random
import threading

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedError

from fleet import protocol
from fleet.agent.client import (
    CarAgent,
    Faults,
    StaticSensors,
    decode_embedding,
    encode_embeddings,
    wait_event,
    websocket_url,
)
from fleet.agent.models import get_runner
from fleet.agent.sim import DAY_S, LINE, STARLINK, SimulatedSensors

pytestmark = pytest.mark.pure  # no database, layer or broker: the same code in every profile

CLIENT_SAMPLES = [
    protocol.Hello(agent_version="1.0.0", runtimes=["all-minilm-l6-v2"], throughput_mops={"int8": 91_000, "fp32": 30_500}),
    protocol.Telemetry(battery_pct=63.5, driving=False, plugged_in=True, on_wifi=True),
    protocol.Telemetry(battery_pct=63.5, driving=False, plugged_in=True, on_wifi=True, charging_kw=7.2, temp_c=31.0,
                       seq=41),
    protocol.Hello(agent_version="1.0.0", runtimes=["all-minilm-l6-v2"], throughput_mops={"int8": 91_000},
                   uplink_kbps=20_000, leases=((12, 3),)),
    protocol.Heartbeat(leases=[(12, 3), (13, 1)]),
    protocol.WorkRequest(),
    protocol.Result(unit_id=12, epoch=3, embeddings_b64=encode_embeddings(np.ones((2, 4), np.float32))),
    protocol.Release(unit_id=12, epoch=3, reason="driving"),
]
SERVER_SAMPLES = [
    protocol.Welcome(vehicle_id=7, heartbeat_s=10, lease_ttl_s=60, max_inflight=4),
    protocol.UnitAssign(
        unit_id=12, epoch=3, runtime="all-minilm-l6-v2", precision="int8", texts=["a car", "ünïcode ✓"], lease_ttl_s=60
    ),
    protocol.NoWork(reason="no_jobs", retry_after_s=2.5),
    protocol.UnitWithdraw(unit_id=12, epoch=3, reason="lease_expired"),
    protocol.ResultAck(unit_id=12, epoch=3, accepted=False, reason="stale_epoch"),
    protocol.Ack(seq=41),
    protocol.Error(code="bad_field", message="unit_id must be an integer"),
]


def wire(obj: dict) -> str:
    return json.dumps(obj)


def test_samples_cover_every_message_type():
    assert {m.TYPE for m in CLIENT_SAMPLES} == set(protocol.CLIENT_MESSAGES)
    assert {m.TYPE for m in SERVER_SAMPLES} == set(protocol.SERVER_MESSAGES)


@pytest.mark.parametrize(
    "msg, registry, other",
    [(m, protocol.CLIENT_MESSAGES, protocol.SERVER_MESSAGES) for m in CLIENT_SAMPLES]
    + [(m, protocol.SERVER_MESSAGES, protocol.CLIENT_MESSAGES) for m in SERVER_SAMPLES],
    ids=lambda v: getattr(v, "TYPE", None),
)
def test_round_trip(msg, registry, other):
    text = wire(protocol.dump(msg))
    parsed = protocol.parse(protocol.decode(text), registry)
    assert parsed == msg
    assert type(parsed) is type(msg)
    assert wire(protocol.dump(parsed)) == text
    # A message is only valid in its own direction.
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse(protocol.decode(text), other)
    assert exc.value.code == "unknown_type"


def telemetry(**changes) -> dict:
    obj = protocol.dump(protocol.Telemetry(battery_pct=50.0, driving=False, plugged_in=False, on_wifi=True))
    obj.update(changes)
    return obj


def assign(**changes) -> dict:
    obj = protocol.dump(SERVER_SAMPLES[1])
    obj.update(changes)
    return obj


@pytest.mark.parametrize(
    "obj, registry, code",
    [
        (telemetry(v=2), protocol.CLIENT_MESSAGES, "bad_version"),
        (telemetry(v="1"), protocol.CLIENT_MESSAGES, "bad_version"),
        ({k: v for k, v in telemetry().items() if k != "v"}, protocol.CLIENT_MESSAGES, "bad_version"),
        (telemetry(type="telemetry.v2"), protocol.CLIENT_MESSAGES, "unknown_type"),
        ({"v": 1}, protocol.CLIENT_MESSAGES, "unknown_type"),
        ({k: v for k, v in telemetry().items() if k != "driving"}, protocol.CLIENT_MESSAGES, "missing_field"),
        ({k: v for k, v in assign().items() if k != "texts"}, protocol.SERVER_MESSAGES, "missing_field"),
        (telemetry(battery_pct="50"), protocol.CLIENT_MESSAGES, "bad_field"),
        (telemetry(battery_pct=100.5), protocol.CLIENT_MESSAGES, "bad_field"),
        (telemetry(battery_pct=True), protocol.CLIENT_MESSAGES, "bad_field"),
        (telemetry(driving=1), protocol.CLIENT_MESSAGES, "bad_field"),
        (telemetry(on_wifi=None), protocol.CLIENT_MESSAGES, "bad_field"),
        (assign(unit_id=True), protocol.SERVER_MESSAGES, "bad_field"),
        (assign(epoch="3"), protocol.SERVER_MESSAGES, "bad_field"),
        (assign(unit_id=-1), protocol.SERVER_MESSAGES, "bad_field"),
        (assign(unit_id=1.0), protocol.SERVER_MESSAGES, "bad_field"),
        (assign(texts="one text"), protocol.SERVER_MESSAGES, "bad_field"),
        (assign(texts=["ok", 3]), protocol.SERVER_MESSAGES, "bad_field"),
        (assign(texts=["t"] * (protocol.MAX_TEXTS_PER_UNIT + 1)), protocol.SERVER_MESSAGES, "bad_field"),
        (protocol.dump(protocol.Heartbeat(leases=[[1, 2, 3]])), protocol.CLIENT_MESSAGES, "bad_field"),
        (protocol.dump(protocol.Heartbeat(leases=[[1, False]])), protocol.CLIENT_MESSAGES, "bad_field"),
        (protocol.dump(protocol.Hello("1", ["m"], {"int8": 1.5})), protocol.CLIENT_MESSAGES, "bad_field"),
        (protocol.dump(protocol.Hello("1", ["m"], {"int8": True})), protocol.CLIENT_MESSAGES, "bad_field"),
        (protocol.dump(protocol.Hello("1", "m", {})), protocol.CLIENT_MESSAGES, "bad_field"),
        (protocol.dump(protocol.NoWork("x", -1)), protocol.SERVER_MESSAGES, "bad_field"),
    ],
)
def test_malformed_objects(obj, registry, code):
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse(protocol.decode(wire(obj)), registry)
    assert exc.value.code == code


@pytest.mark.parametrize(
    "text, code",
    [
        ("[]", "bad_message"),
        ('"hello"', "bad_message"),
        ("1", "bad_message"),
        ("null", "bad_message"),
        ("{", "bad_json"),
        ("", "bad_json"),
        ("x" * (protocol.MAX_MESSAGE_BYTES + 1), "too_large"),
        (wire(telemetry(pad="x" * protocol.MAX_MESSAGE_BYTES)), "too_large"),
    ],
)
def test_malformed_text(text, code):
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode(text)
    assert exc.value.code == code


@pytest.mark.parametrize("special", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(special):
    for field, registry in (("battery_pct", protocol.CLIENT_MESSAGES), ("retry_after_s", protocol.SERVER_MESSAGES)):
        base = telemetry() if registry is protocol.CLIENT_MESSAGES else protocol.dump(SERVER_SAMPLES[2])
        text = wire({**base, field: 0}).replace(f'"{field}": 0', f'"{field}": {special}')
        with pytest.raises(protocol.ProtocolError) as exc:
            protocol.parse(protocol.decode(text), registry)
        assert exc.value.code == "bad_field"


# --- the agent's embedding encoding ---------------------------------------------------------------------

def test_embedding_base64_round_trips_bit_exact():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5, 384)).astype(np.float32)
    vectors[0, :4] = [0.0, -0.0, np.finfo(np.float32).tiny / 4, np.finfo(np.float32).max]
    encoded = encode_embeddings(vectors)
    assert len(encoded) == 5
    decoded = np.stack([decode_embedding(b64) for b64 in encoded])
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded.view(np.uint32), vectors.view(np.uint32))


def test_embedding_base64_is_little_endian_float32():
    assert encode_embeddings(np.array([[1.0, -2.0]], dtype=np.float64)) == [
        base64.b64encode(b"\x00\x00\x80\x3f\x00\x00\x00\xc0").decode()
    ]
    big_endian = np.array([[1.0]], dtype=">f4")
    assert encode_embeddings(big_endian) == [base64.b64encode(b"\x00\x00\x80\x3f").decode()]


def test_a_result_of_real_size_fits_the_protocol():
    vectors = np.random.default_rng(1).standard_normal((8, 384)).astype(np.float32)
    msg = protocol.Result(unit_id=1, epoch=1, embeddings_b64=encode_embeddings(vectors))
    parsed = protocol.parse(protocol.decode(wire(protocol.dump(msg))), protocol.CLIENT_MESSAGES)
    assert np.array_equal(np.stack([decode_embedding(b) for b in parsed.embeddings_b64]), vectors)


@pytest.mark.parametrize(
    "server, url",
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/vehicle/"),
        ("https://market.example/", "wss://market.example/ws/vehicle/"),
        ("https://market.example/prefix", "wss://market.example/prefix/ws/vehicle/"),
    ],
)
def test_websocket_url(server, url):
    assert websocket_url(server) == url


# --- the agent against a fake gateway -------------------------------------------------------------------

MODEL = "all-minilm-l6-v2"
DIMS = 384
TEXTS = ["a parked car", "an idle computer"]


class Peer:
    """The fake gateway's end of one connection: what the agent sent, in order, and how the connection ended."""

    def __init__(self, ws: ServerConnection):
        self.ws = ws
        self.frames: list[tuple[float, str, dict]] = []  # (loop time, raw text, decoded) of every message
        self.invalid: list[str] = []  # messages the gateway's parser would refuse
        self.ended = asyncio.Event()
        self.close_frame_received: bool | None = None
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for raw in self.ws:
                try:
                    protocol.parse(protocol.decode(raw), protocol.CLIENT_MESSAGES)
                except protocol.ProtocolError as exc:
                    self.invalid.append(f"{exc.code}: {raw[:200]}")
                msg = json.loads(raw)
                self.frames.append((loop.time(), raw, msg))
                self._inbox.put_nowait(msg)
            self.close_frame_received = True
        except ConnectionClosedError as exc:
            self.close_frame_received = exc.rcvd is not None
        finally:
            self.ended.set()

    async def expect(self, type_: str, timeout: float = 5.0, where=lambda msg: True) -> dict:
        """The agent's next message of ``type_`` (matching ``where``); others are skipped (and kept in frames)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._inbox.get()
                if msg["type"] == type_ and where(msg):
                    return msg

    def sent(self, type_: str) -> list[dict]:
        return [msg for _, _, msg in self.frames if msg["type"] == type_]

    def sent_at(self, type_: str) -> list[float]:
        return [t for t, _, msg in self.frames if msg["type"] == type_]

    async def send(self, type_: str, **fields) -> None:
        await self.ws.send(json.dumps({"v": protocol.VERSION, "type": type_, **fields}))

    async def welcome(self, *, heartbeat_s: int = 1, lease_ttl_s: int = 30, max_inflight: int = 2) -> None:
        await self.send("welcome", vehicle_id=7, heartbeat_s=heartbeat_s, lease_ttl_s=lease_ttl_s,
                        max_inflight=max_inflight)

    async def assign(self, unit_id: int, epoch: int = 1, texts: list[str] = TEXTS) -> None:
        await self.send("unit.assign", unit_id=unit_id, epoch=epoch, runtime=MODEL, precision="int8",
                        texts=list(texts), lease_ttl_s=30)


@contextlib.asynccontextmanager
async def fake_gateway():
    """A websocket server on 127.0.0.1 (any free port): yields its URL and a queue of a Peer per connection."""
    peers: asyncio.Queue[Peer] = asyncio.Queue()

    async def handler(ws: ServerConnection) -> None:
        peer = Peer(ws)
        peers.put_nowait(peer)
        await peer.pump()

    async with serve(handler, "127.0.0.1", 0) as server:
        host, port = server.sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}", peers


async def next_peer(peers: asyncio.Queue, timeout: float = 5.0) -> Peer:
    return await asyncio.wait_for(peers.get(), timeout)


@contextlib.asynccontextmanager
async def running(agent: CarAgent):
    """Run the agent for the block, then stop it (and surface anything it raised)."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def scenario(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


class GatedExecutor(concurrent.futures.ThreadPoolExecutor):
    """Computes only once ``gate`` is set, so that a test can hold the agent in the middle of a unit."""

    def __init__(self):
        super().__init__(1, thread_name_prefix="gated")
        self.gate, self.started, self.finished = threading.Event(), threading.Event(), threading.Event()

    def submit(self, fn, /, *args, **kwargs):
        def gated():
            self.started.set()
            if not self.gate.wait(10):
                raise TimeoutError("the test never opened the gate")
            try:
                return fn(*args, **kwargs)
            finally:
                self.finished.set()

        return super().submit(gated)


@pytest.fixture(scope="module")
def executor():
    get_runner(MODEL, "int8")  # load the model once, so that computing a unit takes milliseconds
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="test-agent") as pool:
        yield pool


@pytest.fixture
def gated(executor):
    pool = GatedExecutor()
    yield pool
    pool.gate.set()
    pool.shutdown(wait=True)


def make_agent(url: str, executor, **options) -> CarAgent:
    options.setdefault("sensors", StaticSensors())
    return CarAgent(url, "dev_test", runtimes=[MODEL], executor=executor, name="test-car", max_backoff_s=0.1,
                    throughput_mops={"int8": 100_000}, **options)


def result_problem(texts: int, embeddings_b64: list[str]) -> str | None:
    """The gateway's result check (fleet.services.result_problem), restated here without Django: one finite,
    unit-norm vector of the model's size per text."""
    if len(embeddings_b64) != texts:
        return f"expected {texts} embeddings, got {len(embeddings_b64)}"
    for i, b64 in enumerate(embeddings_b64):
        vector = decode_embedding(b64)
        if vector.shape != (DIMS,) or not np.all(np.isfinite(vector)):
            return f"embedding {i} must be {DIMS} finite values"
        if not math.isclose(float(np.linalg.norm(vector)), 1.0, abs_tol=0.02):
            return f"embedding {i} is not normalised"
    return None


def test_the_agent_takes_a_batch_for_one_request_and_never_holds_more_than_max_inflight(gated):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, gated, sensors=StaticSensors(uplink_kbps=12_000))
            async with running(agent):
                peer = await next_peer(peers)
                hello = await peer.expect("hello")
                assert hello["uplink_kbps"] == 12_000 and hello["leases"] == []
                await peer.welcome(max_inflight=3)
                await peer.expect("work.request")
                await peer.assign(1)  # a batch of two for one request
                await peer.assign(2)
                await peer.expect("work.request")  # room for one more
                await peer.assign(3)
                await peer.assign(4)  # one too many
                release = await peer.expect("release")
                assert (release["unit_id"], release["reason"]) == (4, "over_capacity")
                heartbeat = await peer.expect("heartbeat", where=lambda m: len(m["leases"]) == 3)
                assert heartbeat["leases"] == [[1, 1], [2, 1], [3, 1]]
                await asyncio.sleep(0.5)
                assert len(peer.sent("work.request")) == 2  # full: no request while computing is held up

                gated.gate.set()
                results = [await peer.expect("result") for _ in range(3)]
                assert [r["unit_id"] for r in results] == [1, 2, 3]
                await until(lambda: len(peer.sent("work.request")) == 3)  # room again
                assert all(len(h["leases"]) <= 3 for h in peer.sent("heartbeat"))
                assert not peer.invalid
        assert agent.stats.units_done == 3 and agent.stats.released == 1

    scenario(run())


def test_a_local_cap_below_max_inflight_limits_the_leases(executor, gated):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, gated, max_units=1)
            async with running(agent):
                peer = await next_peer(peers)
                await peer.welcome(max_inflight=4)
                await peer.expect("work.request")
                await peer.assign(1)
                await peer.assign(2)
                release = await peer.expect("release")
                assert (release["unit_id"], release["reason"]) == (2, "over_capacity")
                await asyncio.sleep(0.5)
                assert len(peer.sent("work.request")) == 1

    scenario(run())


def test_a_held_lease_and_its_unsent_result_survive_a_dropped_connection(gated):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, gated)
            async with running(agent):
                first = await next_peer(peers)
                await first.welcome(max_inflight=1)
                await first.expect("work.request")
                await first.assign(5, epoch=2)
                assert await asyncio.to_thread(gated.started.wait, 5)  # the agent is computing the unit
                first.ws.transport.abort()  # the network goes away
                gated.gate.set()

                second = await next_peer(peers)
                hello = await second.expect("hello")
                assert hello["leases"] == [[5, 2]]
                assert await asyncio.to_thread(gated.finished.wait, 5)
                await asyncio.sleep(0.3)
                assert not first.sent("result") and not second.sent("result")  # nothing is sent before the welcome

                await second.welcome(max_inflight=1)
                result = await second.expect("result")
                assert (result["unit_id"], result["epoch"]) == (5, 2)
                assert result_problem(len(TEXTS), result["embeddings_b64"]) is None
                assert not first.sent("release")
        assert (agent.stats.reconnects, agent.stats.resumed, agent.stats.units_done) == (1, 1, 1)

    scenario(run())


def test_a_withdrawal_after_reconnecting_drops_the_resumed_lease(gated):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, gated)
            async with running(agent):
                first = await next_peer(peers)
                await first.welcome(max_inflight=1)
                await first.expect("work.request")
                await first.assign(5, epoch=2)
                assert await asyncio.to_thread(gated.started.wait, 5)
                first.ws.transport.abort()

                second = await next_peer(peers)
                assert (await second.expect("hello"))["leases"] == [[5, 2]]
                await second.send("unit.withdraw", unit_id=5, epoch=2, reason="lease_expired")
                await second.welcome(max_inflight=1)
                gated.gate.set()
                assert await asyncio.to_thread(gated.finished.wait, 5)
                heartbeat = await second.expect("heartbeat")
                assert heartbeat["leases"] == []
                await until(lambda: second.sent("work.request"))  # room again
                assert not second.sent("result")
        assert agent.stats.withdrawn == 1 and agent.stats.units_done == 0

    scenario(run())


def test_on_stop_the_agent_releases_its_leases_and_closes_normally(gated):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, gated)
            async with running(agent):
                peer = await next_peer(peers)
                await peer.welcome(max_inflight=1)
                await peer.expect("work.request")
                await peer.assign(9)
                assert await asyncio.to_thread(gated.started.wait, 5)
            await asyncio.wait_for(peer.ended.wait(), 5)
            release = peer.sent("release")
            assert [(r["unit_id"], r["reason"]) for r in release] == [(9, "shutdown")]
            assert peer.close_frame_received and peer.ws.close_code == 1000

    scenario(run())


# Faults, each with probability 1 and seeded.

async def lease_one_unit(peer: Peer, unit_id: int = 1, **welcome) -> float:
    """Welcome, answer the first work request with one unit; the loop time it was sent."""
    await peer.expect("hello")
    await peer.welcome(max_inflight=1, **welcome)
    await peer.expect("work.request")
    sent_at = asyncio.get_running_loop().time()
    await peer.assign(unit_id)
    return sent_at


def test_fault_duplicate_sends_the_same_result_twice(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(duplicate=1.0, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                await lease_one_unit(peer)
                await peer.expect("result")
                await peer.expect("result")
                first, second = [raw for _, raw, msg in peer.frames if msg["type"] == "result"]
                assert first == second
        assert agent.stats.faults_injected == {"duplicate": 1} and agent.stats.units_done == 1

    scenario(run())


def test_fault_corrupt_sends_a_result_the_gateway_must_refuse(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(corrupt=1.0, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                await lease_one_unit(peer)
                result = await peer.expect("result")
                assert result_problem(len(TEXTS), result["embeddings_b64"]) is not None
                assert not peer.invalid  # a well-formed message: only its content is wrong
        assert agent.stats.faults_injected == {"corrupt": 1}

    scenario(run())


def test_fault_drop_socket_ends_the_connection_without_a_close_frame_and_resumes(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(drop_socket=1.0, seed=1))
            async with running(agent):
                first = await next_peer(peers)
                await lease_one_unit(first, unit_id=3)
                await asyncio.wait_for(first.ended.wait(), 5)
                assert first.close_frame_received is False
                assert not first.sent("result") and not first.sent("release")

                second = await next_peer(peers)
                assert (await second.expect("hello"))["leases"] == [[3, 1]]
                await second.welcome(max_inflight=1)
                result = await second.expect("result")  # the fault happens once per lease
                assert result["unit_id"] == 3
        assert agent.stats.faults_injected == {"drop_socket": 1} and agent.stats.resumed == 1

    scenario(run())


def test_fault_stall_stops_heartbeats_ignores_a_withdrawal_and_sends_the_result_late(executor):
    stall_s = 1.6

    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(stall=1.0, stall_s=stall_s, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                assigned_at = await lease_one_unit(peer, unit_id=4, heartbeat_s=1)
                await asyncio.sleep(0.5)
                await peer.send("unit.withdraw", unit_id=4, epoch=1, reason="lease_expired")
                await peer.expect("result", timeout=stall_s + 3)
                result_at = peer.sent_at("result")[0]
                assert result_at - assigned_at >= stall_s
                assert not [t for t in peer.sent_at("heartbeat") if assigned_at + 0.3 < t < result_at]
                heartbeat = await peer.expect("heartbeat", timeout=2)  # heartbeats come back afterwards
                assert heartbeat["leases"] == []
        assert agent.stats.faults_injected == {"stall": 1} and agent.stats.withdrawn == 0

    scenario(run())


def test_fault_late_delays_the_result_while_heartbeats_keep_the_lease(executor):
    late_s = 1.5

    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults(late=1.0, late_s=late_s, seed=1))
            async with running(agent):
                peer = await next_peer(peers)
                assigned_at = await lease_one_unit(peer, unit_id=6, heartbeat_s=1)
                await peer.expect("result", timeout=late_s + 3)
                result_at = peer.sent_at("result")[0]
                assert result_at - assigned_at >= late_s
                assert any(m["leases"] == [[6, 1]] for m in peer.sent("heartbeat"))
        assert agent.stats.faults_injected == {"late": 1}

    scenario(run())


def test_without_faults_nothing_is_injected(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, faults=Faults())
            async with running(agent):
                peer = await next_peer(peers)
                await lease_one_unit(peer)
                result = await peer.expect("result")
                assert result_problem(len(TEXTS), result["embeddings_b64"]) is None
                await asyncio.sleep(0.3)
                assert len(peer.sent("result")) == 1
        assert agent.stats.faults_injected == {}

    scenario(run())


def test_fault_draws_are_per_lease_and_deterministic():
    faults = Faults(drop_socket=0.3, stall=0.3, duplicate=0.3, corrupt=0.3, late=0.3, seed=7)
    draws = [faults.draw(random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(7)
    many = [faults.draw(rng) for _ in range(2000)]
    for kind in Faults.KINDS:
        assert 0.25 < sum(kind in d for d in many) / len(many) < 0.35


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("", Faults()),
        ("drop_socket=0.05,stall=0.02,duplicate=0.05,corrupt=0.02,late=0.02",
         Faults(drop_socket=0.05, stall=0.02, duplicate=0.05, corrupt=0.02, late=0.02)),
        (" stall = 1 , stall_s=2.5, seed=3 ", Faults(stall=1.0, stall_s=2.5, seed=3)),
    ],
)
def test_faults_parse(spec, expected):
    assert Faults.parse(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("drop=0.1", "unknown fault 'drop'"),
        ("stall", "expected name=value"),
        ("stall=", "expected name=value"),
        ("stall=lots", "not a number"),
        ("stall=1.5", "between 0 and 1"),
        ("late=-0.1", "between 0 and 1"),
        ("late=nan", "between 0 and 1"),
        ("late_s=-2", "0 or more"),
        ("seed=1.5", "not a number"),
        ("late=0.1,late=0.2", "given twice"),
    ],
)
def test_faults_parse_refuses_bad_input(spec, message):
    with pytest.raises(ValueError, match=message):
        Faults.parse(spec)


# Telemetry seq and acks.

def test_telemetry_is_numbered_and_a_gateway_that_stops_acking_is_left(executor):
    async def run():
        async with fake_gateway() as (url, peers):
            agent = make_agent(url, executor, telemetry_interval_s=0.2, ack_timeout_s=1.0)
            async with running(agent):
                first = await next_peer(peers)
                await first.expect("hello")
                await first.welcome(heartbeat_s=1)
                for _ in range(6):  # a healthy gateway: every telemetry acknowledged, for more than the timeout
                    telemetry = await first.expect("telemetry")
                    await first.send("ack", seq=telemetry["seq"])
                assert not first.ended.is_set()
                # Then the gateway hangs: no more acks. The agent closes and reconnects.
                await asyncio.wait_for(first.ended.wait(), 3)
                assert first.close_frame_received and first.ws.close_code == 1011

                second = await next_peer(peers)
                await second.expect("hello")
                await second.welcome(heartbeat_s=1)
                await second.expect("telemetry")
                await second.expect("telemetry")
                seqs = [m["seq"] for m in first.sent("telemetry") + second.sent("telemetry")]
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # increasing across connections too
        assert agent.stats.acks == 6 and agent.stats.ack_timeouts == 1 and agent.stats.reconnects == 1

    scenario(run())


# --- the simulated car ------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(sensors: SimulatedSensors, clock: FakeClock, real_seconds: float, tick: float = 0.25) -> dict:
    """Poll like the agent does, working whenever parked; readings per tick."""
    readings = {"battery": [], "driving": [], "wifi": [], "plugged": []}
    for _ in range(int(real_seconds / tick)):
        clock.now += tick
        driving = sensors.driving
        if not driving:
            sensors.on_work(tick, sensors.hardware_watts)
        readings["battery"].append(sensors.battery_pct)
        readings["driving"].append(driving)
        readings["wifi"].append(sensors.on_wifi)
        readings["plugged"].append(sensors.plugged_in)
    return readings


def drive_starts(driving: list[bool]) -> int:
    return sum(1 for before, now in zip(driving, driving[1:]) if now and not before)


@pytest.mark.parametrize("seed", range(10))
def test_simulated_day(seed):
    clock = FakeClock()
    sensors = SimulatedSensors(random.Random(seed), 150, time_scale=60, clock=clock, start_s=0)
    day = simulate(sensors, clock, DAY_S / 60)
    assert all(0 <= b <= 100 for b in day["battery"])
    assert drive_starts(day["driving"]) == 2
    parked = 1 - sum(day["driving"]) / len(day["driving"])
    assert 0.85 <= parked < 1
    assert day["wifi"][0] and day["wifi"][-1]  # at home, on WiFi, overnight
    assert not any(p and d for p, d in zip(day["plugged"], day["driving"]))
    assert sensors.work_kwh == pytest.approx(150 * 24 * parked / 1000, rel=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_simulated_fortnight_keeps_the_battery_in_range(seed):
    clock = FakeClock()
    sensors = SimulatedSensors(random.Random(seed), 250, time_scale=600, clock=clock)
    days = simulate(sensors, clock, 14 * DAY_S / 600)
    assert all(0 < b <= 100 for b in days["battery"])
    assert 27 <= drive_starts(days["driving"]) <= 29  # a random start may cut one commute off
    assert any(days["plugged"])


def test_a_fleet_at_any_moment_is_mostly_parked():
    clock = FakeClock()
    rng = random.Random(42)
    fleet = [SimulatedSensors(random.Random(rng.getrandbits(64)), 100, clock=clock) for _ in range(300)]
    for _ in range(6):
        clock.now += 240  # four simulated hours
        assert sum(car.driving for car in fleet) / len(fleet) <= 0.15
    wifi_at_work = {car.on_wifi for car in fleet if car.phase == "work"}
    assert wifi_at_work == {True, False}  # some workplaces have WiFi for the car, some do not


def test_simulated_wifi_drops_out_at_the_documented_rate():
    """Outages start about once every 4 simulated hours and last 1 to 15 simulated minutes (the defaults)."""
    clock = FakeClock()
    cars = [SimulatedSensors(random.Random(seed), 100, time_scale=60, clock=clock, start_s=0) for seed in range(6)]
    step_s = 30  # simulated seconds between readings
    starts, durations = 0, []
    began: list[float | None] = [None] * len(cars)
    for step in range(int(7 * DAY_S / step_s)):  # a week
        clock.now += step_s / 60
        for i, car in enumerate(cars):
            outage = car.wifi_outage
            if outage and began[i] is None:
                starts, began[i] = starts + 1, step * step_s
            elif not outage and began[i] is not None:
                durations.append(step * step_s - began[i])
                began[i] = None
            if car.phase == "home":
                assert car.on_wifi is not outage  # at home the car is on WiFi unless it is out
    expected = len(cars) * 7 * 24 / 4
    assert 0.8 * expected <= starts <= 1.2 * expected
    assert all(60 - step_s <= d <= 15 * 60 + step_s for d in durations)
    assert 6 * 60 <= sum(durations) / len(durations) <= 10 * 60  # uniform 1-15 min: 8 on average


def test_simulated_wifi_outages_can_be_turned_off():
    clock = FakeClock()
    car = SimulatedSensors(random.Random(1), 100, time_scale=600, clock=clock, wifi_outage_every_h=None)
    for _ in range(2000):
        clock.now += 1
        assert not car.wifi_outage


def test_simulated_uplinks_are_in_the_documented_ranges():
    rng = random.Random(3)
    cars = [SimulatedSensors(random.Random(rng.getrandbits(64)), 100, clock=FakeClock()) for _ in range(400)]
    satellite = [car.uplink_kbps for car in cars if car.link == STARLINK]
    line = [car.uplink_kbps for car in cars if car.link == LINE]
    assert all(5_000 <= kbps <= 20_000 for kbps in satellite)  # Starlink: 5-20 Mbps up
    assert all(20_000 <= kbps <= 720_000 for kbps in line)  # fibre or cable, within 802.11ac's ~720 Mbps
    assert 0.05 <= len(satellite) / len(cars) <= 0.15  # starlink_share 0.1
    assert max(line) == 720_000 and min(line) < 50_000  # the whole range is used
    assert all(isinstance(kbps, int) for kbps in satellite + line)


def test_a_loop_waiting_on_an_event_stops_when_cancelled_as_the_event_is_set():
    """The agent's loops wait with wait_event; a cancellation that lands as the event is set must end them
    (asyncio.wait_for on Python 3.11 lost it, and a stopping car's session never ended)."""

    async def waiter(event: asyncio.Event) -> None:
        while True:
            event.clear()
            await wait_event(event, 10)

    async def main() -> str:
        event = asyncio.Event()
        task = asyncio.create_task(waiter(event))
        for _ in range(3):
            await asyncio.sleep(0)
        event.set()
        await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1)
        return "cancelled" if task in done and task.cancelled() else "still running"

    assert asyncio.run(main()) == "cancelled"


def test_wait_event_says_whether_the_event_came():
    async def main() -> tuple[bool, bool]:
        event = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, event.set)
        return await wait_event(event, 1), await wait_event(asyncio.Event(), 0.01)

    assert asyncio.run(main()) == (True, False)
