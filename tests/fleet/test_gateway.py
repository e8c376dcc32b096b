"""The vehicle gateway over websockets (channels' WebsocketCommunicator against the real ASGI application):
authentication, the lease cycle with real inference, withdrawal when a car may no longer work, fencing."""

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.conf import settings

from billing.models import MeterRecord
from fleet import services
from fleet.agent.client import encode_embeddings
from fleet.agent.models import get_runner
from fleet.gateway.batch import live_batch
from fleet.models import Lease, Vehicle, WorkUnit
from marketplace import flows
from marketplace.asgi import application
from tests.factories import OwnerFactory

pytestmark = pytest.mark.django_db(transaction=True)

HEALTHY = {"battery_pct": 80.0, "driving": False, "plugged_in": True, "on_wifi": True}


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    channel_layers.backends = {}
    yield
    channel_layers.backends = {}


@pytest.fixture
def paired():
    from fleet.models import HardwareGeneration

    vehicle, code = services.vehicle_create(owner=OwnerFactory(), name="Test car",
                                            hardware=HardwareGeneration.objects.get(code="HW4"))
    vehicle, token = services.vehicle_pair(code=code)
    return vehicle, token


def communicator(token: str | None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token is not None else []
    return WebsocketCommunicator(application, "/ws/vehicle/", headers=headers)


async def send(comm, type_, **fields):
    await comm.send_to(text_data=json.dumps({"v": 1, "type": type_, **fields}))


async def receive(comm, timeout=5):
    return json.loads(await comm.receive_from(timeout=timeout))


async def receive_type(comm, type_, timeout=5):
    while True:
        message = await receive(comm, timeout)
        if message["type"] == type_:
            return message


async def online(token, **telemetry):
    comm = communicator(token)
    connected, _ = await comm.connect()
    assert connected
    await send(comm, "hello", agent_version="test", runtimes=["all-minilm-l6-v2"], throughput_mops={"int8": 200_000})
    welcome = await receive(comm)
    assert welcome["type"] == "welcome"
    await send(comm, "telemetry", **{**HEALTHY, **telemetry})
    await send(comm, "work.request")  # a round trip: hello and telemetry are processed, in order, before it
    assert (await receive(comm))["type"] == "no_work"  # no round has cleared yet
    return comm


async def lease_one(comm):
    # The auction offers only cars that asked for work: the gateway writes the ask in its batch (every
    # GATEWAY_FLUSH_S), written here at once, as it is before any real round clears.
    await live_batch.flush()
    await sync_to_async(flows.auction_tick)()
    await send(comm, "work.request")
    return await receive_type(comm, "unit.assign")


def test_the_handshake_is_refused_for_a_missing_wrong_or_revoked_token(paired):
    vehicle, token = paired

    async def scenario():
        for bad in (None, "", "dev_12345678_wrong", token[:-2] + "xx"):
            connected, _ = await communicator(bad).connect()
            assert not connected, bad
        comm = communicator(token)
        assert (await comm.connect())[0]
        await comm.disconnect()
        await sync_to_async(services.vehicle_token_revoke)(vehicle=vehicle)
        assert not (await communicator(token).connect())[0]

    async_to_sync(scenario)()


def test_a_car_leases_a_unit_computes_it_for_real_and_is_paid(paired, make_job):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        assert assign["precision"] == "int8" and len(assign["texts"]) == 8
        vectors = get_runner(assign["runtime"], assign["precision"]).embed(assign["texts"])
        await send(comm, "result", unit_id=assign["unit_id"], epoch=assign["epoch"], embeddings_b64=encode_embeddings(vectors))
        ack = await receive_type(comm, "result.ack")
        assert ack["accepted"] is True, ack
        # A second result for the same lease is stale: refused, not paid twice.
        await send(comm, "result", unit_id=assign["unit_id"], epoch=assign["epoch"], embeddings_b64=encode_embeddings(vectors))
        again = await receive_type(comm, "result.ack")
        assert again["accepted"] is False and again["reason"] == "stale_lease"
        await comm.disconnect()

    async_to_sync(scenario)()
    job.refresh_from_db()
    assert job.state == "completed" and job.units_done == 1
    record = MeterRecord.objects.get(job=job)
    assert Lease.objects.get(unit__job=job).outcome == "completed"
    # Energy: the HW4's 100 W for the time the unit takes at the rate the car is sold at: it had delivered
    # nothing before this unit, so the provisional figure (its hello's 200,000 Mops/s is only a claim).
    rate = min(200_000, settings.CAPACITY_PROVISIONAL_MOPS_PER_S)
    assert record.energy_mwh == -(-100 * record.mops * 1000 // (rate * 3600)) > 0


@pytest.mark.parametrize("telemetry, reason", [
    ({"driving": True}, "driving"),
    ({"battery_pct": 25.0}, "battery_floor"),
    ({"on_wifi": False}, "not_on_wifi"),
])
def test_a_car_that_may_no_longer_work_loses_its_leases_and_gets_no_new_one(paired, make_job, telemetry, reason):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        await send(comm, "telemetry", **{**HEALTHY, **telemetry})
        withdraw = await receive_type(comm, "unit.withdraw")
        assert (withdraw["unit_id"], withdraw["epoch"], withdraw["reason"]) == (assign["unit_id"], assign["epoch"], reason)
        await send(comm, "work.request")
        refused = await receive_type(comm, "no_work")
        assert refused["reason"] == reason
        # The withdrawn lease's result is refused and not paid.
        await send(comm, "result", unit_id=assign["unit_id"], epoch=assign["epoch"], embeddings_b64=[])
        assert (await receive_type(comm, "result.ack"))["reason"] == "stale_lease"
        await comm.disconnect()

    async_to_sync(scenario)()
    assert set(WorkUnit.objects.filter(job=job).values_list("state", flat=True)) == {"queued"}
    assert Lease.objects.get(unit__job=job).outcome == "withdrawn"
    assert MeterRecord.objects.count() == 0


def test_a_pause_from_the_owner_reaches_the_connected_car_and_requeues_its_leases(paired, make_job):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        await sync_to_async(services.policy_update)(vehicle=vehicle, paused=True)
        withdraw = await receive_type(comm, "unit.withdraw")
        assert (withdraw["unit_id"], withdraw["reason"]) == (assign["unit_id"], "paused")
        await send(comm, "work.request")
        assert (await receive_type(comm, "no_work"))["reason"] == "paused"
        await comm.disconnect()

    async_to_sync(scenario)()
    assert job.units.get().state == "queued"


def test_an_expired_lease_is_requeued_by_the_sweep_and_its_late_result_refused(paired, make_job):
    from datetime import timedelta

    from django.utils import timezone

    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        await sync_to_async(WorkUnit.objects.filter(pk=assign["unit_id"]).update)(
            lease_expires_at=timezone.now() - timedelta(seconds=1))
        assert await sync_to_async(services.leases_sweep)() == 1
        await send(comm, "result", unit_id=assign["unit_id"], epoch=assign["epoch"], embeddings_b64=[])
        assert (await receive_type(comm, "result.ack"))["reason"] == "stale_lease"
        await comm.disconnect()

    async_to_sync(scenario)()
    assert job.units.get().state == "queued"
    assert Lease.objects.get(unit__job=job).outcome == "expired"


def test_a_malformed_result_is_refused_and_the_unit_requeued(paired, make_job):
    vehicle, token = paired
    make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        await send(comm, "result", unit_id=assign["unit_id"], epoch=assign["epoch"], embeddings_b64=["AAAA"] * 8)
        ack = await receive_type(comm, "result.ack")
        assert ack["accepted"] is False and ack["reason"].startswith("bad_result")
        await comm.disconnect()

    async_to_sync(scenario)()
    assert WorkUnit.objects.get().state == "queued" and MeterRecord.objects.count() == 0


def test_bad_messages_get_a_protocol_error_and_the_socket_stays_usable(paired):
    vehicle, token = paired

    async def scenario():
        comm = communicator(token)
        await comm.connect()
        await send(comm, "telemetry", **HEALTHY)
        assert (await receive(comm))["code"] == "hello_first"
        await comm.send_to(text_data="{not json")
        assert (await receive(comm))["code"] == "bad_json"
        await comm.send_to(text_data=json.dumps({"v": 9, "type": "hello"}))
        assert (await receive(comm))["code"] == "bad_version"
        await comm.send_to(text_data="x" * 70_000)
        assert (await receive(comm))["code"] == "too_large"
        await comm.send_to(bytes_data=b"\x00")
        assert (await receive(comm))["code"] == "bad_message"
        await send(comm, "hello", agent_version="t", runtimes=[], throughput_mops={"int8": "fast"})
        assert (await receive(comm))["code"] == "bad_field"
        await send(comm, "hello", agent_version="t", runtimes=[], throughput_mops={})
        assert (await receive(comm))["type"] == "welcome"
        await send(comm, "hello", agent_version="t", runtimes=[], throughput_mops={})
        assert (await receive(comm))["code"] == "out_of_order"
        await send(comm, "teleport")
        assert (await receive(comm))["code"] == "unknown_type"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_a_second_session_with_the_same_token_replaces_the_first(paired):
    vehicle, token = paired

    async def scenario():
        first = await online(token)
        second = await online(token)
        closed = await first.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 4003}
        await send(second, "work.request")
        assert (await receive_type(second, "no_work"))["reason"] == "no_work"
        await second.disconnect()

    async_to_sync(scenario)()


def test_contradictory_battery_levels_are_refused_and_nothing_changes(paired):
    from fleet.models import OwnerPolicy
    from marketplace.core.errors import ValidationFailed

    vehicle, _ = paired
    with pytest.raises(ValidationFailed) as refused:
        services.policy_update(vehicle=vehicle, battery_floor_pct=50, battery_resume_pct=40)
    assert "battery_resume_pct" in refused.value.extra["fields"]
    assert OwnerPolicy.objects.get(vehicle=vehicle).battery_floor_pct == 30


def test_the_gateway_meters_the_cars_data_and_stops_work_at_the_owners_daily_budget(paired, make_job):
    from fleet.models import VehicleDailyUsage

    vehicle, token = paired
    make_job(docs=8)
    services.policy_update(vehicle=vehicle, daily_data_mb=0.0002)  # 200 bytes a day

    async def scenario():
        comm = await online(token)
        await send(comm, "heartbeat", leases=[])
        await send(comm, "telemetry", **HEALTHY)
        await send(comm, "work.request")
        assert (await receive_type(comm, "no_work"))["reason"] == "data_budget"
        await comm.disconnect()

    async_to_sync(scenario)()
    assert VehicleDailyUsage.objects.get(vehicle=vehicle).data_bytes > 200


@pytest.mark.parametrize("change, reason", [
    ({"plugged_in_only": True}, "not_plugged_in"),
    ({"max_temp_c": 30.0}, "temperature"),
    ({"battery_floor_pct": 85, "battery_resume_pct": 90}, "battery_floor"),
    ({"daily_energy_kwh": 0.0}, "energy_budget"),
])
def test_a_policy_change_reaches_the_connected_car_and_requeues_its_leases(paired, make_job, change, reason):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token, plugged_in=False, temp_c=35.0)
        assign = await lease_one(comm)
        await sync_to_async(services.policy_update)(vehicle=vehicle, **change)
        withdraw = await receive_type(comm, "unit.withdraw")
        assert (withdraw["unit_id"], withdraw["reason"]) == (assign["unit_id"], reason)
        await comm.disconnect()

    async_to_sync(scenario)()
    assert job.units.get().state == "queued"


def test_a_flooding_car_is_rate_limited_then_disconnected_with_the_protocol_close_code(paired):
    from fleet import protocol

    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        # Cheap frames (no database work), far faster than the refill rate.
        for _ in range(2 * (protocol.RATE_BURST + protocol.RATE_STRIKES)):
            await send(comm, "teleport")
        codes = []
        while (output := await comm.receive_output(timeout=10))["type"] != "websocket.close":
            codes.append(json.loads(output["text"])["code"])
        assert "rate_limited" in codes and codes.count("unknown_type") >= protocol.RATE_BURST - 10  # online() spent a few
        assert output["code"] == protocol.CLOSE_PROTOCOL_VIOLATION
        # the socket closes, and the session's own disconnect work finishes before the test's database teardown
        await comm.disconnect()
        assert not (await sync_to_async(Vehicle.objects.get)(pk=vehicle.pk)).connected

    async_to_sync(scenario)()


def test_the_token_bucket_refills_at_its_rate():
    from fleet.protocol import RateLimiter

    bucket = RateLimiter(rate_per_s=2, burst=3)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.4) is False and bucket.allow(0.6) is True  # one token back after 0.5 s
    assert [bucket.allow(100.0) for _ in range(4)] == [True, True, True, False]  # never more than the burst


def test_an_idle_connection_outlives_the_channel_layers_blocking_read(paired):
    """channels-redis waits 5 s per blocking pop; redis-py 8 times reads out after 5 s by default, which
    killed every idle consumer (services profile). The settings give reads more time; an idle car stays."""
    import asyncio

    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await asyncio.sleep(6.5)
        await send(comm, "work.request")
        assert (await receive_type(comm, "no_work"))["type"] == "no_work"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_messages_about_another_cars_leases_change_nothing(paired, make_job):
    """Unauthorised: a car cannot complete, release or keep a lease that is not its own."""
    from fleet.models import HardwareGeneration

    vehicle, token = paired
    job = make_job(docs=8)
    other, code = services.vehicle_create(owner=OwnerFactory(), name="Other car",
                                          hardware=HardwareGeneration.objects.get(code="HW4"))
    _, other_token = services.vehicle_pair(code=code)

    async def scenario():
        owner_comm = await online(token)
        assign = await lease_one(owner_comm)
        ref = [assign["unit_id"], assign["epoch"]]
        thief = await online(other_token)
        vectors = get_runner(assign["runtime"], assign["precision"]).embed(assign["texts"])
        await send(thief, "result", unit_id=ref[0], epoch=ref[1], embeddings_b64=encode_embeddings(vectors))
        assert (await receive_type(thief, "result.ack"))["reason"] == "stale_lease"
        await send(thief, "release", unit_id=ref[0], epoch=ref[1], reason="mine now")
        await send(thief, "heartbeat", leases=[ref])  # claims to hold it: told to drop it
        withdraw = await receive_type(thief, "unit.withdraw")
        assert [withdraw["unit_id"], withdraw["epoch"], withdraw["reason"]] == [*ref, "not_current"]
        await thief.disconnect()
        # A reconnecting car that lists a lease that is not its own at hello is told to drop it, too.
        again = communicator(other_token)
        await again.connect()
        await send(again, "hello", agent_version="t", runtimes=["all-minilm-l6-v2"], throughput_mops={}, leases=[ref])
        assert (await receive(again))["type"] == "welcome"
        assert (await receive_type(again, "unit.withdraw"))["unit_id"] == ref[0]
        await again.disconnect()
        await owner_comm.disconnect()

    async_to_sync(scenario)()
    unit = WorkUnit.objects.get(job=job)
    assert (unit.state, unit.leased_to_id) == ("leased", vehicle.pk)  # still the first car's, untouched
    assert MeterRecord.objects.count() == 0


def test_a_reconnecting_car_resumes_its_leases_and_its_result_is_accepted(paired, make_job):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        await comm.disconnect()  # the socket drops while the car computes
        vectors = get_runner(assign["runtime"], assign["precision"]).embed(assign["texts"])
        back = communicator(token)
        await back.connect()
        await send(back, "hello", agent_version="t", runtimes=["all-minilm-l6-v2"], throughput_mops={"int8": 200_000},
                   leases=[[assign["unit_id"], assign["epoch"]]])
        assert (await receive(back))["type"] == "welcome"
        await send(back, "telemetry", **HEALTHY)
        await send(back, "result", unit_id=assign["unit_id"], epoch=assign["epoch"],
                   embeddings_b64=encode_embeddings(vectors))
        assert (await receive_type(back, "result.ack"))["accepted"] is True
        await back.disconnect()

    async_to_sync(scenario)()
    assert WorkUnit.objects.get(job=job).state == "done"
    assert list(Lease.objects.filter(unit__job=job).values_list("outcome", flat=True)) == ["completed"]


def test_a_car_that_reconnects_without_its_leases_gives_them_back_at_once(paired, make_job):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        await lease_one(comm)
        await comm.disconnect()
        assert await sync_to_async(WorkUnit.objects.filter(state="leased").count)() == 1  # kept for a resume
        restarted = await online(token)  # an agent that lost its memory says hello without leases
        await restarted.disconnect()

    async_to_sync(scenario)()
    assert WorkUnit.objects.get(job=job).state == "queued"
    assert Lease.objects.get(unit__job=job).reason == "not_held"


@pytest.mark.parametrize("message, code", [
    ({"v": 1, "type": "telemetry", "battery_pct": 150, "driving": False, "plugged_in": True, "on_wifi": True}, "bad_field"),
    ({"v": 1, "type": "telemetry", "battery_pct": 50, "driving": "no", "plugged_in": True, "on_wifi": True}, "bad_field"),
    ({"v": 1, "type": "result", "unit_id": 1, "epoch": 1, "embeddings_b64": ["A" * 20_000]}, "bad_field"),
    ({"v": 1, "type": "result", "unit_id": 1, "epoch": 1, "embeddings_b64": ["AAAA"] * 65}, "bad_field"),
    ({"v": 1, "type": "result", "unit_id": 1, "epoch": 1, "embeddings_b64": ["AAAA"] * 40 + ["A" * 2000] * 40}, "too_large"),
    ({"v": 1, "type": "heartbeat", "leases": [[1, 2, 3]]}, "bad_field"),
    ({"v": 1, "type": "heartbeat", "leases": [[i, 1] for i in range(33)]}, "bad_field"),
    ({"v": 1, "type": "release", "unit_id": -1, "epoch": 1, "reason": "x"}, "bad_field"),
    ({"v": 1, "type": "release", "unit_id": 1, "epoch": 1}, "missing_field"),
    ({"v": 1, "type": "welcome", "vehicle_id": 1, "heartbeat_s": 1, "lease_ttl_s": 1, "max_inflight": 1}, "unknown_type"),
    ({"v": 1}, "unknown_type"),
    ([1, 2, 3], "bad_message"),
])
def test_each_malformed_or_oversize_message_gets_its_error_code(paired, message, code):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await comm.send_to(text_data=json.dumps(message))
        error = await receive_type(comm, "error")
        assert error["code"] == code, error
        await send(comm, "work.request")  # the socket is still usable
        assert (await receive_type(comm, "no_work"))["type"] == "no_work"
        await comm.disconnect()

    async_to_sync(scenario)()


def test_a_lost_control_message_is_repaired_by_the_next_heartbeat(paired, make_job):
    """The channel layer may drop a withdrawal (full, or the connection moved); the database is the truth
    and the car's next heartbeat brings it the withdrawal."""
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        assign = await lease_one(comm)
        layer = channel_layers["default"]

        async def lost(group, message):  # the layer drops every push from now on (full, or a lost connection)
            return None

        layer.group_send = lost
        await sync_to_async(services.policy_update)(vehicle=vehicle, paused=True)
        assert await comm.receive_nothing(timeout=1)  # the push never arrived
        await send(comm, "heartbeat", leases=[[assign["unit_id"], assign["epoch"]]])
        withdraw = await receive_type(comm, "unit.withdraw", timeout=5)
        assert (withdraw["unit_id"], withdraw["reason"]) == (assign["unit_id"], "not_current")
        await comm.disconnect()

    async_to_sync(scenario)()
    assert job.units.get().state == "queued"


def test_telemetry_is_acknowledged_and_written_in_the_processs_batch(paired):
    import asyncio

    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await send(comm, "telemetry", **{**HEALTHY, "battery_pct": 71.5, "temp_c": 22.0}, seq=7)
        assert (await receive_type(comm, "ack"))["seq"] == 7
        for _ in range(40):  # written by the batch within GATEWAY_FLUSH_S (1 s), not by the message itself
            row = await sync_to_async(Vehicle.objects.values("battery_pct", "temp_c").get)(pk=vehicle.pk)
            if row == {"battery_pct": 71.5, "temp_c": 22.0}:
                break
            await asyncio.sleep(0.1)
        assert row == {"battery_pct": 71.5, "temp_c": 22.0}
        await comm.disconnect()

    async_to_sync(scenario)()


def test_an_assignment_the_car_never_got_is_requeued_after_its_heartbeats_miss_it(paired, make_job, monkeypatch):
    import asyncio

    from fleet.gateway import VehicleConsumer

    monkeypatch.setattr(VehicleConsumer, "UNCONFIRMED_TTLS", 0.5 / 30)  # half a second of the 30 s lease
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        comm = await online(token)
        await lease_one(comm)  # pretend it was lost on the way: the car's heartbeats do not list it
        await send(comm, "heartbeat", leases=[])  # too soon to tell: it may still be on its way
        await asyncio.sleep(1.5)
        assert await sync_to_async(WorkUnit.objects.filter(state="leased").count)() == 1
        await send(comm, "heartbeat", leases=[])
        for _ in range(30):
            if await sync_to_async(WorkUnit.objects.filter(state="queued").count)() == 1:
                break
            await asyncio.sleep(0.1)
        await comm.disconnect()

    async_to_sync(scenario)()
    assert WorkUnit.objects.get(job=job).state == "queued"
    assert Lease.objects.get(unit__job=job).reason == "not_held"
