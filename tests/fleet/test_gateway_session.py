"""The gateway's session machinery (fleet.gateway.DeviceConsumer, a plain ASGI application) and its pacing of
the garbage collector: what the protocol tests in test_gateway.py take for granted."""

import asyncio
import gc

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer

from fleet import services
from fleet.gateway import CollectorPacing
from fleet.models import Vehicle
from tests.fleet.test_gateway import fresh_channel_layer, online, paired, receive_type, send  # noqa: F401 -- fixtures

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_control_message_without_a_handler_is_logged_and_the_session_goes_on(paired, caplog):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        await get_channel_layer().group_send(services.vehicle_group(vehicle.pk), {"type": "vehicle.teleport"})
        await asyncio.sleep(0.1)
        await send(comm, "work.request")
        assert (await receive_type(comm, "no_work"))["reason"] == "no_work"
        await comm.disconnect()

    async_to_sync(scenario)()
    assert "no handler for control message 'vehicle.teleport'" in caplog.text


def test_a_car_whose_socket_closes_is_marked_disconnected(paired):
    vehicle, token = paired

    async def scenario():
        comm = await online(token)
        assert await sync_to_async(Vehicle.objects.filter(pk=vehicle.pk, connected=True).exists)()
        await comm.disconnect()

    async_to_sync(scenario)()
    vehicle.refresh_from_db()
    assert (vehicle.connected, vehicle.channel_name) == (False, "")


def test_the_collector_pacing_freezes_what_is_alive_and_unfreezes_for_its_full_pass(monkeypatch):
    monkeypatch.setattr(CollectorPacing, "FREEZE_S", 0.05)
    pacing = CollectorPacing()

    async def scenario():
        pacing.ensure_running()
        await asyncio.sleep(0.2)
        assert gc.get_freeze_count() > 0  # what lived is frozen: the collector no longer scans it
        monkeypatch.setattr(CollectorPacing, "FULL_S", 0.0)  # the next tick is the full pass
        collected = []
        gc.callbacks.append(probe := lambda phase, info: phase == "stop" and collected.append(info["generation"]))
        try:
            await asyncio.sleep(0.2)
        finally:
            gc.callbacks.remove(probe)
            pacing.task.cancel()
        assert 2 in collected  # the full pass ran, over everything

    try:
        async_to_sync(scenario)()
    finally:
        gc.unfreeze()
