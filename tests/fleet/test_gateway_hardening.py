"""A car is a stranger: whatever a dishonest or broken client sends, the gateway answers with the protocol's
``error`` or closes with the documented code (docs/vehicle-protocol.md), logs no traceback, and goes on serving
that car or the others. Over channels' WebsocketCommunicator against the ASGI application, and, for what only a
real server shows (frames that are not UTF-8 or over its size limit, a refused handshake, a close and what comes
after it), over real websockets to uvicorn in this process, configured as docs/deploy.md runs it. Then the
liveness timeouts: no hello in time, and a car gone silent."""

import asyncio
import json
import logging
import threading
import time

import pytest
import uvicorn
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.db import connections
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from billing.localpeer import free_port
from fleet import protocol, services
from fleet.models import HardwareGeneration, Vehicle
from marketplace.asgi import application
from tests.factories import OwnerFactory
from tests.fleet.test_gateway import (  # noqa: F401 -- fresh_channel_layer and paired are fixtures
    HEALTHY, communicator, fresh_channel_layer, online, paired, receive, send)
from tests.fleet.test_gateway_errors import still_answered

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = {"agent_version": "test", "runtimes": ["all-minilm-l6-v2"], "throughput_mops": {"int8": 200_000}}


def assert_no_traceback(caplog) -> None:
    assert "Traceback" not in caplog.text
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def nested(depth: int) -> str:
    """A JSON value of arrays nested ``depth`` deep."""
    return "[" * depth + "]" * depth


# --- bad input over the ASGI application ------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    nested(30_000),  # deeper than the JSON parser recurses: its RecursionError was a traceback and internal_error
    nested(protocol.MAX_DEPTH + 1),  # parsed, but past the protocol's bound
    '{"v":1,"type":"heartbeat","leases":' + nested(200) + "}",  # deep inside a field
], ids=["30000-deep", "over-max-depth", "deep-field"])
def test_json_nested_too_deep_gets_bad_json_and_the_session_goes_on(paired, caplog, frame):
    vehicle, token = paired

    async def scenario():
        # Given a car online, when it sends JSON nested too deep
        comm = await online(token)
        await comm.send_to(text_data=frame)
        # then it hears bad_json and goes on,
        answer = await receive(comm)
        assert (answer["type"], answer["code"]) == ("error", "bad_json"), answer
        assert str(protocol.MAX_DEPTH) in answer["message"]
        await still_answered(comm, seq=1)
        # while nesting up to the bound is left to the schema (here: a lease must be [unit_id, epoch]).
        await comm.send_to(text_data='{"v":1,"type":"heartbeat","leases":' + nested(protocol.MAX_DEPTH - 1) + "}")
        assert (await receive(comm))["code"] == "bad_field"
        await comm.disconnect()

    async_to_sync(scenario)()
    assert_no_traceback(caplog)


LONE_SURROGATES_BEFORE_HELLO = [
    r'{"v":1,"type":"hello","agent_version":"\udc00","runtimes":[],"throughput_mops":{}}',
    r'{"v":1,"type":"hello","agent_version":"t","runtimes":["all-\ud800"],"throughput_mops":{}}',
    r'{"v":1,"type":"hello","agent_version":"t","runtimes":[],"throughput_mops":{"\ud800":1}}',
    r'{"v":1,"type":"hello","agent_version":"\ud83d","runtimes":[],"throughput_mops":{}}',  # a pair's first half
]
LONE_SURROGATES_AFTER_HELLO = [
    r'{"v":1,"type":"\ud800"}',
    r'{"v":1,"type":"release","unit_id":1,"epoch":1,"reason":"\ud800"}',
    r'{"v":1,"type":"result","unit_id":1,"epoch":1,"embeddings_b64":["AAAA\udfff"]}',
    r'{"v":1,"type":"telemetry","battery_pct":50,"driving":false,"plugged_in":true,"on_wifi":true,"\udbff":0}',
    '{"v":1,"type":"release","unit_id":1,"epoch":1,"reason":"\ud800"}',  # not escaped: a str with the surrogate
]


@pytest.mark.parametrize("frame", LONE_SURROGATES_BEFORE_HELLO)
def test_a_lone_surrogate_in_a_hello_gets_bad_json_and_the_car_may_say_hello_again(paired, caplog, frame):
    vehicle, token = paired

    async def scenario():
        comm = communicator(token)
        assert (await comm.connect())[0]
        # Given a hello whose strings are not Unicode text (it could be neither stored nor sent on)
        await comm.send_to(text_data=frame)
        # then it is refused as bad JSON, not stored (which failed with a traceback and internal_error),
        assert (await receive(comm))["code"] == "bad_json"
        # and a proper hello is welcomed.
        await send(comm, "hello", **HELLO)
        assert (await receive(comm))["type"] == "welcome"
        await still_answered(comm, seq=2)
        await comm.disconnect()

    async_to_sync(scenario)()
    assert_no_traceback(caplog)
    assert Vehicle.objects.get(pk=vehicle.pk).agent_version == "test"


@pytest.mark.parametrize("frame", LONE_SURROGATES_AFTER_HELLO)
def test_a_lone_surrogate_anywhere_in_a_message_gets_bad_json_and_a_surrogate_pair_is_text(paired, caplog, frame):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await comm.send_to(text_data=frame)
        answer = await receive(comm)
        assert (answer["type"], answer["code"]) == ("error", "bad_json"), answer
        protocol.parse(answer, protocol.SERVER_MESSAGES)  # the agent reads it (no surrogate echoed back)
        # A surrogate pair is one character (here an emoji): a release with it is no error.
        await comm.send_to(text_data=r'{"v":1,"type":"release","unit_id":1,"epoch":1,"reason":"\ud83d\ude97"}')
        await still_answered(comm, seq=3)
        await comm.disconnect()

    async_to_sync(scenario)()
    assert_no_traceback(caplog)


def test_the_size_limit_counts_utf8_bytes_not_characters(paired):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        # 40,000 characters, 80,000 bytes on the wire: over MAX_MESSAGE_BYTES (it was parsed as if under it)
        reason = "é" * 40_000
        await comm.send_to(text_data=json.dumps({"v": 1, "type": "release", "unit_id": 1, "epoch": 1, "reason": reason},
                                                ensure_ascii=False))
        assert (await receive(comm))["code"] == "too_large"
        await still_answered(comm, seq=4)
        await comm.disconnect()

    async_to_sync(scenario)()


def test_after_its_protocol_close_a_flooding_car_hears_nothing_more(paired, caplog):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        for _ in range(2 * (protocol.RATE_BURST + protocol.RATE_STRIKES)):
            await send(comm, "teleport")
        while (output := await comm.receive_output(timeout=10))["type"] != "websocket.close":
            pass
        assert output["code"] == protocol.CLOSE_PROTOCOL_VIOLATION
        # Frames on their way after the close are dropped: no second close (an ASGI server raises on one), no answer.
        for _ in range(20):
            await send(comm, "telemetry", **HEALTHY, seq=5)
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()

    async_to_sync(scenario)()
    assert_no_traceback(caplog)


def test_after_its_token_is_revoked_a_car_hears_nothing_more_than_its_close(paired):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await sync_to_async(services.vehicle_token_revoke)(vehicle=vehicle)
        assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": protocol.CLOSE_TOKEN_REVOKED}
        await send(comm, "telemetry", **HEALTHY, seq=6)  # sent before the car read its close
        await send(comm, "work.request")
        assert await comm.receive_nothing(timeout=0.5)
        await comm.disconnect()

    async_to_sync(scenario)()


def test_a_websocket_to_an_unknown_path_is_refused_and_an_unknown_page_is_still_djangos_404(paired, caplog):
    vehicle, token = paired

    async def scenario():
        stray = WebsocketCommunicator(application, "/ws/nowhere/",
                                      headers=[(b"authorization", f"Bearer {token}".encode())])
        assert (await stray.connect()) == (False, 1000)  # refused before accept: HTTP 403 on the handshake
        page = await HttpCommunicator(application, "GET", "/no/such/page/", headers=[(b"host", b"testserver")]).get_response()
        assert page["status"] == 404
        comm = await online(token)  # and the gateway's own path serves as before
        await comm.disconnect()

    async_to_sync(scenario)()
    assert_no_traceback(caplog)


# --- over real websockets, to uvicorn in this process ----------------------------------------------------

@pytest.fixture
def gateway_server():
    """uvicorn in this process as docs/deploy.md runs it (websockets-sansio, frames up to 128 KiB, no deflate),
    its log records going to the root logger (caplog). Database work runs on the server's thread (the outer
    sync context), whose connection is closed when the server stops."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        application, host="127.0.0.1", port=port, ws="websockets-sansio", ws_max_size=2 * protocol.MAX_MESSAGE_BYTES,
        ws_per_message_deflate=False, lifespan="off", log_config=None))

    def serve():
        try:
            async_to_sync(server.serve)()
        finally:
            connections.close_all()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"ws://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def talk(ws, message: dict | str | bytes, *, text: bool | None = None) -> dict:
    await ws.send(message if isinstance(message, str | bytes) else json.dumps(message), text=text)
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def acknowledged(ws, seq: int) -> None:
    """The session goes on: a telemetry with ``seq`` is acknowledged (nothing else arrives before)."""
    assert await talk(ws, {"v": 1, "type": "telemetry", **HEALTHY, "seq": seq}) == {"v": 1, "type": "ack", "seq": seq}


async def closed_with(ws) -> int:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return ws.close_code


def second_car() -> str:
    vehicle, code = services.vehicle_create(owner=OwnerFactory(), name="Other car",
                                            hardware=HardwareGeneration.objects.get(code="HW4"))
    return services.vehicle_pair(code=code)[1]


def test_bad_frames_over_a_real_websocket_get_their_error_and_the_session_goes_on(gateway_server, paired, caplog):
    vehicle, token = paired

    async def scenario():
        async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(token)) as ws:
            assert (await talk(ws, r'{"v":1,"type":"hello","agent_version":"\ud800","runtimes":[],"throughput_mops":{}}')
                    )["code"] == "bad_json"
            assert (await talk(ws, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"
            for seq, (frame, code) in enumerate([
                    (nested(30_000), "bad_json"), (r'{"v":1,"type":"\udfff"}', "bad_json"), (b"\x00\x01", "bad_message"),
                    ("x" * (protocol.MAX_MESSAGE_BYTES + 1), "too_large")]):
                answer = await talk(ws, frame)
                assert (answer["type"], answer["code"]) == ("error", code), (frame[:20], answer)
                await acknowledged(ws, seq=seq)

    async_to_sync(scenario)()
    assert_no_traceback(caplog)


def test_a_frame_not_utf8_or_over_the_servers_limit_closes_only_its_own_socket(gateway_server, paired, caplog):
    vehicle, token = paired
    other = second_car()

    async def scenario():
        async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(other)) as bystander:
            assert (await talk(bystander, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"
            # A text frame that is not UTF-8 is closed by the server with 1007 (invalid frame payload data),
            async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(token)) as ws:
                assert (await talk(ws, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"
                await ws.send(b"{\xff\xfe}", text=True)
                assert await closed_with(ws) == 1007
            # a frame over the server's limit (twice MAX_MESSAGE_BYTES) with 1009 (message too big): the server
            # closes as soon as it reads the frame's length, so a client still sending may see its connection
            # reset instead (1006).
            async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(token)) as ws:
                assert (await talk(ws, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"
                await ws.send("x" * (2 * protocol.MAX_MESSAGE_BYTES + 1))
                assert await closed_with(ws) in (1009, 1006)
            # and the other car's session goes on.
            await acknowledged(bystander, seq=9)

    async_to_sync(scenario)()
    assert_no_traceback(caplog)
    assert "Invalid UTF-8 sequence received from client" in caplog.text  # a warning, in one line


def test_a_flooding_car_is_closed_once_over_a_real_websocket_and_the_server_goes_on(gateway_server, paired, caplog):
    vehicle, token = paired

    async def scenario():
        async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(token)) as ws:
            assert (await talk(ws, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"
            try:
                for _ in range(2 * (protocol.RATE_BURST + protocol.RATE_STRIKES)):
                    await ws.send('{"v":1,"type":"teleport"}')
            except ConnectionClosed:
                pass
            assert await closed_with(ws) == protocol.CLOSE_PROTOCOL_VIOLATION
        async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(token)) as ws:  # back, after backoff
            assert (await talk(ws, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"
            await acknowledged(ws, seq=10)

    async_to_sync(scenario)()
    assert_no_traceback(caplog)  # the second close after 4002 was uvicorn's "Unexpected ASGI message" traceback


def test_an_unknown_websocket_path_is_refused_with_403_not_500(gateway_server, paired, caplog):
    vehicle, token = paired

    async def scenario():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{gateway_server}/ws/nowhere/", additional_headers=bearer(token)):
                pass
        assert refused.value.response.status_code == 403
        async with connect(f"{gateway_server}/ws/vehicle/", additional_headers=bearer(token)) as ws:
            assert (await talk(ws, {"v": 1, "type": "hello", **HELLO}))["type"] == "welcome"

    async_to_sync(scenario)()
    assert_no_traceback(caplog)


# --- liveness --------------------------------------------------------------------------------------------

def test_a_connection_that_sends_no_hello_in_time_is_closed_with_4004(paired, settings, caplog):
    vehicle, token = paired
    settings.GATEWAY_HELLO_TIMEOUT_S, settings.GATEWAY_IDLE_TIMEOUT_S = 0.4, 60.0

    async def scenario():
        # Given a car that says hello at once: it outlives the hello timeout
        talker = communicator(token)
        assert (await talker.connect())[0]
        await send(talker, "hello", **HELLO)
        assert (await receive(talker))["type"] == "welcome"
        await asyncio.sleep(0.8)
        await still_answered(talker, seq=7)
        await talker.disconnect()
        # When a connection sends anything but a hello (which does not count)
        comm = communicator(token)
        connected_at = time.monotonic()
        assert (await comm.connect())[0]
        await send(comm, "telemetry", **HEALTHY)
        assert (await receive(comm))["code"] == "hello_first"
        # then it is closed with 4004 once the hello timeout has passed.
        assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": protocol.CLOSE_HELLO_TIMEOUT}
        assert time.monotonic() - connected_at >= 0.4
        await comm.disconnect()

    async_to_sync(scenario)()
    assert not Vehicle.objects.get(pk=vehicle.pk).connected
    assert "no hello in time" in caplog.text
    assert_no_traceback(caplog)


def test_a_car_silent_after_its_hello_is_closed_with_4005_and_a_talking_one_is_not(paired, settings, caplog):
    vehicle, token = paired
    settings.GATEWAY_HELLO_TIMEOUT_S, settings.GATEWAY_IDLE_TIMEOUT_S = 60.0, 0.6

    async def scenario():
        comm = await online(token)
        # Given a car that heartbeats (every 0.2 s) for three idle timeouts: it stays
        for _ in range(9):
            await send(comm, "heartbeat", leases=[])
            await asyncio.sleep(0.2)
        await still_answered(comm, seq=8)
        # When it goes silent, then it is closed with 4005 once the idle timeout has passed.
        silent_at = time.monotonic()
        assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": protocol.CLOSE_IDLE}
        assert time.monotonic() - silent_at >= 0.6
        await comm.disconnect()

    async_to_sync(scenario)()
    assert not Vehicle.objects.get(pk=vehicle.pk).connected
    assert_no_traceback(caplog)
