"""A car's websocket session: DeviceConsumer (the handshake and the session loop, as a plain ASGI application)
and VehicleConsumer (the protocol, fleet.protocol). Database work goes through fleet.services, or through
marketplace.flows where it crosses apps; each car message that needs it makes one call, in its ``on_<type>``
handler: ``hello`` fleet.services.vehicle_connected, ``work.request`` flows.units_lease, ``result``
flows.unit_complete, ``release`` fleet.services.leases_withdraw.

Whatever handling a car's message raises is answered with a protocol ``error`` and the session goes on: a
ProtocolError or an ApplicationError (a service's rule, e.g. billing's ``reservation_released``) with its own
code and message, anything else, logged, with ``internal_error``. Never a traceback. Once the gateway has closed
a session it sends nothing more, and frames still arriving are dropped unanswered."""

import asyncio
import collections
import logging
import time

from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from fleet import eligibility, protocol, selectors, services, workloads
from fleet.gateway.batch import live_batch
from fleet.gateway.collector import collector_pacing
from fleet.gateway.liveness import liveness
from fleet.selectors import GatewayView
from marketplace import flows
from marketplace.core.errors import ApplicationError

log = logging.getLogger(__name__)
#: The answer to a message whose handling failed unexpectedly (the failure is logged; the car may try again).
INTERNAL_ERROR = ("internal_error", "the gateway could not handle this message; the connection stays open")


def _bearer_token(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class DeviceConsumer:
    """One device's websocket session, as a plain ASGI application that speaks the channel layer itself.

    It authenticates the device token from the ``Authorization: Bearer`` header and refuses the handshake
    (HTTP 403) before accepting when it is missing, wrong or revoked. Then frames from the device are read in
    order by the session's own coroutine, and control messages from the channel layer (``{"type": "a.b"}``,
    handled by the method ``a_b``) by a second task. channels' AsyncWebsocketConsumer multiplexes both through
    ``await_many_dispatch``, which creates a task and runs an ``asyncio.wait`` over two tasks for every frame:
    with telemetry that cost as much as the rest of the gateway's work on a message (tests/bench/gateway.py).
    The methods a subclass uses keep channels' names and meanings (``connect``, ``accept``, ``receive``,
    ``send``, ``close``, ``disconnect``, ``channel_layer``, ``channel_name``, ``scope``). A session closes once:
    after its close, ``close`` and ``send`` do nothing (an ASGI server refuses any message after a close with
    an exception) and frames from the device that were already on their way are dropped."""

    vehicle_id: int | None = None
    close_sent = False
    max_inflight: int | None = None  # what the welcome announced: the car holds no more, so it is leased no more
    channel_layer_alias = DEFAULT_CHANNEL_LAYER

    @classmethod
    def as_asgi(cls):
        async def app(scope, receive, send):
            await cls()(scope, receive, send)

        app.consumer_class = cls
        return app

    async def __call__(self, scope, receive, send):
        self.scope, self.base_send = scope, send
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        message = await receive()
        if message["type"] != "websocket.connect":  # the client left before the handshake
            return
        control, code = None, 1006
        try:
            if not await self.connect():
                await self.close()  # before accept(): the handshake is refused (HTTP 403)
                return
            collector_pacing.ensure_running()
            control = asyncio.create_task(self._control())
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    if self.close_sent:  # the gateway closed this session: what the device still sent goes unread
                        continue
                    try:
                        await self.receive(text_data=message.get("text"), bytes_data=message.get("bytes"))
                    except OSError:  # the client is gone (uvicorn's ClientDisconnected): its disconnect comes next
                        pass
                elif kind == "websocket.disconnect":
                    code = message.get("code", 1006)
                    break
        finally:
            if control is not None:
                control.cancel()
            if self.vehicle_id is not None:
                await self.disconnect(code)

    async def _control(self):
        """Control messages for this session through the channel layer, one at a time."""
        while True:
            event = await self.channel_layer.receive(self.channel_name)
            handler = getattr(self, event.get("type", "").replace(".", "_"), None)
            if handler is None or event["type"].startswith("_"):
                log.warning("gateway: no handler for control message %r", event.get("type"))
                continue
            try:
                await handler(event)
            except OSError:  # the client is gone (uvicorn's ClientDisconnected): the session ends next
                return
            except Exception:  # noqa: BLE001 -- one failed control message must not end the session
                log.exception("gateway: vehicle %s: control message %s failed", self.vehicle_id, event["type"])

    async def connect(self) -> bool:
        vehicle = await database_sync_to_async(services.device_authenticate)(token=_bearer_token(self.scope))
        if vehicle is None:
            return False
        self.vehicle_id = vehicle.pk
        group = services.vehicle_group(vehicle.pk)
        # One session per car: an older connection with the same token is told to close.
        await self.channel_layer.group_send(group, {"type": "vehicle.replaced", "channel": self.channel_name})
        await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.on_authenticated()
        return True

    async def on_authenticated(self):
        pass

    async def accept(self):
        await self.base_send({"type": "websocket.accept"})

    async def send(self, text_data: str):
        if not self.close_sent:
            await self.base_send({"type": "websocket.send", "text": text_data})

    async def close(self, code: int | None = None):
        if self.close_sent:
            return
        self.close_sent = True
        await self.base_send({"type": "websocket.close"} if code is None else {"type": "websocket.close", "code": code})

    async def disconnect(self, code):
        await self.channel_layer.group_discard(services.vehicle_group(self.vehicle_id), self.channel_name)


class VehicleConsumer(DeviceConsumer):
    """One car's session. Every message is checked against fleet.protocol. Telemetry is decided in memory
    against a cached view of the car (fleet.selectors.GatewayView) and acknowledged at once; it is written
    through the car's database queue only when it changes a decision, else in the process's batch, with the
    heartbeats. Leasing, results and releases go through the car's database queue, in order."""

    hello_received = False
    closed = False
    view: GatewayView | None = None
    decided: tuple[str | None, bool] = (None, False)  # the decision last acted on (reason, battery hold)
    DB_BOUND = frozenset({"work.request", "result", "release"})
    UNCONFIRMED_TTLS = 1.0
    view_at = 0.0
    unmetered_bytes = 0  # traffic with the car not yet added to its daily data usage

    async def send_message(self, message: protocol.Message) -> None:
        if self.close_sent:  # closing: what it would have been told is reconciled at its next hello
            return
        text = protocol.encode(protocol.dump(message))
        self.unmetered_bytes += len(text)
        await self.base_send({"type": "websocket.send", "text": text})

    async def on_authenticated(self):
        self.limiter, self.strikes = protocol.RateLimiter(), 0
        self.tasks: set[asyncio.Task] = set()
        self.unconfirmed: dict[tuple[int, int], float] = {}  # leases sent, not yet listed in a heartbeat
        # The car's database-bound work waiting its turn, and the task that runs it while there is any: most cars,
        # most of the time, have none (an empty deque alone is about 760 bytes a car).
        self.db_queue: collections.deque | None = None
        self.db_worker: asyncio.Task | None = None
        liveness.connected(self)  # closed with CLOSE_HELLO_TIMEOUT unless its hello comes in time

    @property
    def last_seen(self) -> float:
        """When the car's last frame arrived (monotonic): every frame passes the rate limiter, which stamps it."""
        return self.limiter.stamp

    def expire(self, code: int) -> None:
        """Close the session for its silence (fleet.gateway.liveness), without holding up the caller."""
        self._spawn(self._expire(code))

    async def _expire(self, code: int) -> None:
        if self.close_sent:  # closed already (flooding, revoked, replaced): its disconnect comes next
            return
        log.info("gateway: vehicle %s: closing with %s (%s)", self.vehicle_id, code,
                 "no hello in time" if code == protocol.CLOSE_HELLO_TIMEOUT else "silent")
        try:
            await self.close(code=code)
        except OSError:  # the client is gone already: its disconnect comes next
            pass

    async def _db_work(self):
        """This car's database-bound work (leasing, results, releases, decisions that changed), one at a time
        in arrival order; meanwhile the socket keeps being read and telemetry acknowledged, so a busy database
        slows the car's work down but never makes its connection look dead."""
        try:
            while self.db_queue:
                handler, argument = self.db_queue.popleft()
                try:
                    await handler(argument)
                except Exception as exc:  # noqa: BLE001 -- one failed message must not end the car's session
                    if self.closed:
                        return
                    await self._answer_failure(exc, handler)
        finally:
            self.db_worker = None
            if not self.db_queue:
                self.db_queue = None

    def _later(self, handler, argument=None) -> None:
        """Queue database-bound work behind what this car already asked for."""
        if self.db_queue is None:
            self.db_queue = collections.deque()
        self.db_queue.append((handler, argument))
        if self.db_worker is None and not self.closed:
            self.db_worker = self._spawn(self._db_work())

    async def disconnect(self, code):
        self.closed = True
        liveness.forget(self)
        for task in getattr(self, "tasks", ()):
            task.cancel()
        if self.vehicle_id is not None:
            live_batch.forget(self.vehicle_id)
            data, self.unmetered_bytes = self.unmetered_bytes, 0
            await database_sync_to_async(services.vehicle_data_record)(vehicle_id=self.vehicle_id, data_bytes=data)
            await database_sync_to_async(services.vehicle_disconnected)(vehicle_id=self.vehicle_id,
                                                                      channel_name=self.channel_name)
        await super().disconnect(code)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _set_view(self, view: GatewayView) -> None:
        self.view, self.view_at = view, time.monotonic()
        self.decided = (view.reason, view.battery_hold)

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
        handler = None
        try:
            if text_data is None:
                raise protocol.ProtocolError("bad_message", "binary frames are not part of the protocol")
            message = protocol.parse(protocol.decode(text_data), protocol.CLIENT_MESSAGES)
            if not self.hello_received and not isinstance(message, protocol.Hello):
                raise protocol.ProtocolError("hello_first", "send hello before anything else")
            handler = getattr(self, "on_" + message.TYPE.replace(".", "_"))
            if message.TYPE in self.DB_BOUND:
                self._later(handler, message)
            else:
                await handler(message)
        except OSError:  # the client is gone (uvicorn's ClientDisconnected): its disconnect comes next
            raise
        except Exception as exc:  # noqa: BLE001 -- one failed message must not end the car's session
            await self._answer_failure(exc, handler)

    async def _answer_failure(self, exc: Exception, handler) -> None:
        """Answer the car whose message (or the database work it queued) raised ``exc``, with a protocol error
        that fits fleet.protocol.Error: a refusal (ProtocolError, ApplicationError) with its own code and message,
        anything else with INTERNAL_ERROR after logging it. An OSError means the client is gone: logged, not
        answered."""
        if isinstance(exc, protocol.ProtocolError | ApplicationError):
            if isinstance(exc, ApplicationError):  # a service refused: the car is told why, the operator too
                log.warning("gateway: vehicle %s: %s refused: %s: %s", self.vehicle_id,
                            getattr(handler, "__name__", handler), exc.code, exc.message)
            code, message = exc.code, exc.message
        else:
            log.error("gateway: vehicle %s: %s failed", self.vehicle_id, getattr(handler, "__name__", handler),
                      exc_info=exc)
            if isinstance(exc, OSError):
                return
            code, message = INTERNAL_ERROR
        try:
            await self.send_message(protocol.Error(code=str(code)[:64], message=str(message)[:512]))
        except OSError:  # the client is gone: its disconnect comes next
            pass

    # --- car -> gateway ----------------------------------------------------------------------------
    async def on_hello(self, msg: protocol.Hello):
        if self.hello_received:
            raise protocol.ProtocolError("out_of_order", "hello was already received on this connection")
        stale, view = await database_sync_to_async(services.vehicle_connected)(
            vehicle_id=self.vehicle_id, channel_name=self.channel_name, agent_version=msg.agent_version,
            runtimes=msg.runtimes, tasks=msg.tasks, throughput_mops=msg.throughput_mops, uplink_kbps=msg.uplink_kbps,
            held=list(msg.leases))
        self.hello_received = True
        liveness.hello(self)
        self._set_view(view)
        self.max_inflight = view.max_inflight
        await self.send_message(protocol.Welcome(vehicle_id=self.vehicle_id, heartbeat_s=settings.HEARTBEAT_INTERVAL_S,
                                                 lease_ttl_s=settings.LEASE_TTL_S, max_inflight=view.max_inflight))
        await self._withdraw(stale, reason="not_current")

    async def on_telemetry(self, msg: protocol.Telemetry):
        now = timezone.now()
        fields = {"battery_pct": msg.battery_pct, "driving": msg.driving, "plugged_in": msg.plugged_in,
                  "on_wifi": msg.on_wifi, "charging_kw": msg.charging_kw, "temp_c": msg.temp_c}
        decision = selectors.vehicle_decide(
            rules=self.view.rules, usage=self.view.usage, now=now, battery_hold=self.decided[1],
            state=eligibility.LiveState(connected=True, last_seen_at=now, **fields))
        if (decision.reason, decision.battery_hold) != self.decided:  # written and acted on now
            self.decided = (decision.reason, decision.battery_hold)
            live_batch.forget(self.vehicle_id)
            self._later(self._telemetry_write, fields)
        else:
            fields["last_seen_at"], fields["connected"], fields["channel_name"] = now, True, self.channel_name
            live_batch.state(self.vehicle_id, fields)
        if msg.seq is not None:
            await self.send_message(protocol.Ack(seq=msg.seq))

    async def _telemetry_write(self, fields: dict):
        withdrawn, view = await database_sync_to_async(services.vehicle_telemetry_record)(
            vehicle_id=self.vehicle_id, channel_name=self.channel_name, **fields)
        self._set_view(view)
        await self._withdraw(withdrawn, reason=view.reason or "")

    async def on_heartbeat(self, msg: protocol.Heartbeat):
        # Assignments the car confirms are its own now; one it still does not list a lease lifetime after it was
        # sent is taken back, as if it had expired (a busy or slow car may list an assignment seconds late;
        # on a live connection nothing is lost on the way, and a broken one is reconciled at the next hello).
        held, now = {tuple(ref) for ref in msg.leases}, time.monotonic()
        lost = [ref for ref, sent in self.unconfirmed.items()
                if ref not in held and now - sent > settings.LEASE_TTL_S * self.UNCONFIRMED_TTLS]
        for ref in [*held, *lost]:
            self.unconfirmed.pop(ref, None)
        if self.view.rules.daily_data_mb is not None or time.monotonic() - self.view_at > settings.GATEWAY_VIEW_REFRESH_S:
            self._later(self._refresh_view)  # a car with a data budget is metered at every heartbeat
        self._spawn(self._heartbeat_answer(live_batch.heartbeat(self.vehicle_id, list(msg.leases), lost)))

    async def _heartbeat_answer(self, future: asyncio.Future):
        try:
            stale = await future
            await self._withdraw(stale, reason="not_current")
        except Exception:  # noqa: BLE001 -- the batch logged it, or the car left; its next heartbeat tries again
            return

    async def _refresh_view(self, _=None):
        # Renew the group membership too: channel layers drop memberships older than a day (group_expiry).
        await self.channel_layer.group_add(services.vehicle_group(self.vehicle_id), self.channel_name)
        data, self.unmetered_bytes = self.unmetered_bytes, 0
        self._set_view(await database_sync_to_async(services.vehicle_data_flush)(vehicle_id=self.vehicle_id,
                                                                                 data_bytes=data))

    async def on_work_request(self, msg: protocol.WorkRequest):
        live_batch.work_requested(self.vehicle_id)  # only cars that ask are offered in the auction
        units, reason = await database_sync_to_async(flows.units_lease)(vehicle_id=self.vehicle_id,
                                                                        inflight_limit=self.max_inflight)
        if not units:
            # A car with nothing to do asks again soon enough to take up, within the round, capacity that other
            # cars won and leave unused (fleet.services._spare_allocations).
            retry = settings.AUCTION_INTERVAL_S
            if reason == "no_work":
                retry = min(retry, settings.CAPACITY_RECLAIM_AFTER_S / 2)
            await self.send_message(protocol.NoWork(reason=reason, retry_after_s=retry))
            return
        for unit in units:
            self.unconfirmed[(unit.pk, unit.lease_epoch)] = time.monotonic()
            job = unit.job
            workload = workloads.get(job.ai_model.task)
            inline = workload.inline_inputs
            await self.send_message(protocol.UnitAssign(
                unit_id=unit.pk, epoch=unit.lease_epoch, runtime=job.ai_model.runtime, precision=job.precision,
                texts=[doc["text"] for doc in unit.inputs] if inline else [], lease_ttl_s=settings.LEASE_TTL_S,
                task=job.ai_model.task, params=workload.unit_params(job.params),
                inputs_url="" if inline else reverse("api-unit-inputs", args=[unit.pk, unit.lease_epoch])))

    async def on_result(self, msg: protocol.Result):
        accepted, reason = await database_sync_to_async(flows.unit_complete)(
            vehicle_id=self.vehicle_id, unit_id=msg.unit_id, epoch=msg.epoch, result=msg.items)
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

    async def vehicle_policy(self, event):
        """The owner changed the car's limits (the service already withdrew what they forbid)."""
        if self.hello_received:
            self._later(self._refresh_view)

    async def vehicle_revoked(self, event):
        await self.close(code=protocol.CLOSE_TOKEN_REVOKED)

    async def vehicle_replaced(self, event):
        if event["channel"] != self.channel_name:
            await self.close(code=protocol.CLOSE_REPLACED)
