"""What a car hears when handling its message fails (fleet.gateway.session): a service's ApplicationError becomes a
protocol ``error`` with the error's own code and message, anything unexpected an ``internal_error``; never a
traceback, and the session goes on."""

import logging

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from billing.models import MeterRecord
from billing.services import reservation_release
from fleet import protocol, services
from fleet.agent.client import encode_embeddings
from fleet.agent.models import get_runner
from fleet.gateway.session import INTERNAL_ERROR
from fleet.models import WorkUnit
from tests.fleet.test_gateway import (  # noqa: F401 -- fresh_channel_layer and paired are fixtures
    HEALTHY, communicator, fresh_channel_layer, lease_one, online, paired, receive, receive_type, send)

pytestmark = pytest.mark.django_db(transaction=True)


def as_the_agent_reads_it(message: dict) -> protocol.Message:
    """The gateway's message parsed as the car's agent parses it (within the schema's limits, or ProtocolError)."""
    return protocol.parse(message, protocol.SERVER_MESSAGES)


async def still_answered(comm, seq: int) -> None:
    """The session goes on: telemetry is acknowledged and a work request answered."""
    await send(comm, "telemetry", **HEALTHY, seq=seq)
    assert (await receive_type(comm, "ack"))["seq"] == seq
    await send(comm, "work.request")
    assert (await receive(comm))["type"] in ("no_work", "unit.assign")


def test_a_result_that_billing_refuses_is_answered_with_the_billing_error_and_the_session_goes_on(paired, make_job,
                                                                                                  caplog):
    vehicle, token = paired
    job = make_job(docs=8)

    async def scenario():
        # Given a car holding a lease of a job whose budget reservation has been released meanwhile
        comm = await online(token)
        assign = await lease_one(comm)
        await sync_to_async(reservation_release)(job=job)
        vectors = get_runner(assign["runtime"], assign["precision"]).embed(assign["texts"])
        # When it sends its (valid) result
        await send(comm, "result", unit_id=assign["unit_id"], epoch=assign["epoch"],
                   embeddings_b64=encode_embeddings(vectors))
        # Then its answer is billing's refusal as a protocol error, not a result.ack
        answer = await receive(comm)
        assert answer == {"v": 1, "type": "error", "code": "reservation_released",
                          "message": "The job's reserved budget was released."}
        assert as_the_agent_reads_it(answer) == protocol.Error(code="reservation_released",
                                                               message="The job's reserved budget was released.")
        # And the car goes on: the session answers its next messages
        await still_answered(comm, seq=11)
        await comm.disconnect()

    with caplog.at_level(logging.WARNING, logger="fleet.gateway"):
        async_to_sync(scenario)()
    # Nothing was booked: the refused completion rolled back, the unit is still leased to the car.
    unit = WorkUnit.objects.get(job=job)
    assert (unit.state, unit.leased_to_id) == ("leased", vehicle.pk)
    assert not MeterRecord.objects.filter(job=job).exists()
    assert "reservation_released" in caplog.text and "Traceback" not in caplog.text


def test_an_unexpected_failure_of_queued_work_is_answered_with_internal_error_and_logged(paired, monkeypatch, caplog):
    vehicle, token = paired
    units_lease, calls = services.units_lease, []

    def units_lease_failing_once(**kwargs):  # the service the gateway calls, at its boundary
        calls.append(kwargs)
        if len(calls) == 2:  # the first is online()'s work request
            raise RuntimeError("the database went away")
        return units_lease(**kwargs)

    monkeypatch.setattr(services, "units_lease", units_lease_failing_once)

    async def scenario():
        comm = await online(token)
        await send(comm, "work.request")
        answer = await receive(comm)
        assert answer == {"v": 1, "type": "error", "code": INTERNAL_ERROR[0], "message": INTERNAL_ERROR[1]}
        as_the_agent_reads_it(answer)
        await still_answered(comm, seq=12)  # its next work request is answered again
        await comm.disconnect()

    async_to_sync(scenario)()
    assert len(calls) == 3
    assert "on_work_request failed" in caplog.text and "the database went away" in caplog.text  # with its traceback


def test_an_unexpected_failure_of_a_hello_is_answered_and_the_car_may_say_hello_again(paired, monkeypatch, caplog):
    vehicle, token = paired
    vehicle_connected, calls = services.vehicle_connected, []

    def vehicle_connected_failing_once(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("the database went away")
        return vehicle_connected(**kwargs)

    monkeypatch.setattr(services, "vehicle_connected", vehicle_connected_failing_once)

    async def scenario():
        comm = communicator(token)
        assert (await comm.connect())[0]
        hello = {"agent_version": "test", "runtimes": ["all-minilm-l6-v2"], "throughput_mops": {"int8": 200_000}}
        await send(comm, "hello", **hello)
        assert (await receive(comm))["code"] == "internal_error"
        await send(comm, "work.request")  # the failed hello did not count
        assert (await receive(comm))["code"] == "hello_first"
        await send(comm, "hello", **hello)
        assert (await receive(comm))["type"] == "welcome"
        await still_answered(comm, seq=13)
        await comm.disconnect()

    async_to_sync(scenario)()
    assert "on_hello failed" in caplog.text


def test_an_error_that_echoes_a_long_value_still_fits_the_protocols_error_message(paired):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await send(comm, "x" * 2_000)  # unknown_type quotes the type it did not know
        answer = await receive(comm)
        assert answer["code"] == "unknown_type" and len(answer["message"]) == 512
        as_the_agent_reads_it(answer)  # the agent would have dropped a longer one as malformed
        await still_answered(comm, seq=14)
        await comm.disconnect()

    async_to_sync(scenario)()
