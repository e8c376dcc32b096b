"""The vehicle websocket gateway. Database work goes through fleet.services; this module only speaks the
protocol (fleet.protocol)."""

import json
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from fleet import protocol, services


def _bearer_token(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class DeviceConsumer(AsyncWebsocketConsumer):
    """Authenticates the device token from the ``Authorization: Bearer`` header and refuses the handshake
    (HTTP 403) before accepting when it is missing, wrong or revoked."""

    vehicle_id: int | None = None

    async def connect(self):
        vehicle = await database_sync_to_async(services.device_authenticate)(token=_bearer_token(self.scope))
        if vehicle is None:
            await self.close()  # before accept(): the handshake is refused
            return
        self.vehicle_id = vehicle.pk
        group = services.vehicle_group(vehicle.pk)
        # One session per car: an older connection with the same token is told to close.
        await self.channel_layer.group_send(group, {"type": "vehicle.replaced", "channel": self.channel_name})
        await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.on_authenticated()

    async def on_authenticated(self):
        pass

    async def disconnect(self, code):
        if self.vehicle_id is not None:
            await self.channel_layer.group_discard(services.vehicle_group(self.vehicle_id), self.channel_name)


class VehicleConsumer(DeviceConsumer):
    hello_received = False
    unmetered_bytes = 0  # traffic with the car not yet added to its daily data usage (flushed on heartbeat)

    async def send_message(self, message: protocol.Message) -> None:
        text = json.dumps(protocol.dump(message), separators=(",", ":"))
        self.unmetered_bytes += len(text)
        await self.send(text_data=text)

    async def _meter_data(self) -> None:
        if self.unmetered_bytes:
            data, self.unmetered_bytes = self.unmetered_bytes, 0
            await database_sync_to_async(services.vehicle_data_record)(vehicle_id=self.vehicle_id, data_bytes=data)

    async def on_authenticated(self):
        self.limiter, self.strikes = protocol.RateLimiter(), 0
        await self.send_message(protocol.Welcome(vehicle_id=self.vehicle_id, heartbeat_s=settings.HEARTBEAT_INTERVAL_S,
                                                 lease_ttl_s=settings.LEASE_TTL_S,
                                                 max_inflight=settings.MAX_LEASES_PER_CAR))

    async def disconnect(self, code):
        if self.vehicle_id is not None:
            await self._meter_data()
            await database_sync_to_async(services.vehicle_disconnected)(vehicle_id=self.vehicle_id,
                                                                      channel_name=self.channel_name)
        await super().disconnect(code)

    async def receive(self, text_data=None, bytes_data=None):
        self.unmetered_bytes += len(text_data or bytes_data or "")
        if not self.limiter.allow(time.monotonic()):
            self.strikes += 1
            if self.strikes > protocol.RATE_STRIKES:
                await self.close(code=protocol.CLOSE_PROTOCOL_VIOLATION)
            elif self.strikes == 1 or self.strikes % 10 == 0:  # say so, without echoing every flooded frame
                await self.send_message(protocol.Error(code="rate_limited", message=(
                    f"more than {protocol.RATE_PER_S:g} messages a second; this one was dropped")))
            return
        try:
            if text_data is None:
                raise protocol.ProtocolError("bad_message", "binary frames are not part of the protocol")
            message = protocol.parse(protocol.decode(text_data), protocol.CLIENT_MESSAGES)
            if not self.hello_received and not isinstance(message, protocol.Hello):
                raise protocol.ProtocolError("hello_first", "send hello before anything else")
            handler = getattr(self, "on_" + message.TYPE.replace(".", "_"))
            await handler(message)
        except protocol.ProtocolError as exc:
            await self.send_message(protocol.Error(code=exc.code, message=exc.message))

    # --- car -> gateway ----------------------------------------------------------------------------
    async def on_hello(self, msg: protocol.Hello):
        self.hello_received = True
        await database_sync_to_async(services.vehicle_connected)(
            vehicle_id=self.vehicle_id, channel_name=self.channel_name, agent_version=msg.agent_version,
            runtimes=msg.runtimes, throughput_mops=msg.throughput_mops)

    async def on_telemetry(self, msg: protocol.Telemetry):
        reason, withdrawn = await database_sync_to_async(services.vehicle_telemetry_record)(
            vehicle_id=self.vehicle_id, battery_pct=msg.battery_pct, driving=msg.driving,
            plugged_in=msg.plugged_in, on_wifi=msg.on_wifi, charging_kw=msg.charging_kw, temp_c=msg.temp_c)
        await self._withdraw(withdrawn, reason=reason or "")
        if msg.seq is not None:
            await self.send_message(protocol.Ack(seq=msg.seq))

    async def on_heartbeat(self, msg: protocol.Heartbeat):
        await self._meter_data()
        stale = await database_sync_to_async(services.leases_heartbeat)(vehicle_id=self.vehicle_id, held=msg.leases)
        await self._withdraw(stale, reason="not_current")

    async def on_work_request(self, msg: protocol.WorkRequest):
        unit, reason = await database_sync_to_async(services.unit_lease)(vehicle_id=self.vehicle_id)
        if unit is None:
            await self.send_message(protocol.NoWork(reason=reason, retry_after_s=settings.AUCTION_INTERVAL_S))
            return
        await self.send_message(protocol.UnitAssign(
            unit_id=unit.pk, epoch=unit.lease_epoch, runtime=unit.job.ai_model.runtime, precision=unit.job.precision,
            texts=[doc["text"] for doc in unit.inputs], lease_ttl_s=settings.LEASE_TTL_S))

    async def on_result(self, msg: protocol.Result):
        accepted, reason = await database_sync_to_async(services.unit_complete)(
            vehicle_id=self.vehicle_id, unit_id=msg.unit_id, epoch=msg.epoch, embeddings_b64=msg.embeddings_b64)
        await self.send_message(protocol.ResultAck(unit_id=msg.unit_id, epoch=msg.epoch, accepted=accepted,
                                                   reason=reason[:64]))

    async def on_release(self, msg: protocol.Release):
        await database_sync_to_async(services.leases_withdraw)(
            vehicle_id=self.vehicle_id, reason=f"released: {msg.reason}", notify=False,
            outcome="released", only=[(msg.unit_id, msg.epoch)])

    async def _withdraw(self, refs, *, reason: str):
        for unit_id, epoch in refs:
            await self.send_message(protocol.UnitWithdraw(unit_id=unit_id, epoch=epoch, reason=reason))

    # --- control messages through the channel layer ------------------------------------------------
    async def vehicle_withdraw(self, event):
        await self._withdraw(event["leases"], reason=event["reason"])

    async def vehicle_revoked(self, event):
        await self.close(code=protocol.CLOSE_TOKEN_REVOKED)

    async def vehicle_replaced(self, event):
        if event["channel"] != self.channel_name:
            await self.close(code=protocol.CLOSE_REPLACED)
