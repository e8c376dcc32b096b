"""Pure tests of the vehicle protocol, the agent's encoding and the simulated car: no server, no database.

Run with ``pytest tests/fleet/test_agent_protocol.py -p no:django``.
"""

import base64
import json
import random

import numpy as np
import pytest

from fleet import protocol
from fleet.agent.client import decode_embedding, encode_embeddings, websocket_url
from fleet.agent.sim import DAY_S, SimulatedSensors

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
