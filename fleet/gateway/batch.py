"""The gateway process's batch of database writes that need not happen at once (one instance, ``live_batch``,
shared by every car's session in the process)."""

import asyncio
import logging
import time

from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from fleet import services

log = logging.getLogger(__name__)
SINGLE_WRITER = settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")


class LiveBatch:
    """One gateway process's batch of database writes that need not happen at once: telemetry that changed
    no decision, and heartbeats (lease extension and reconciliation). Flushed every GATEWAY_FLUSH_S in one
    transaction (fleet.services.vehicles_live_record), so a message costs no database round trip of its own."""

    def __init__(self):
        self.states: dict[int, dict] = {}
        self.held_by: dict[int, list] = {}
        self.lost_by: dict[int, list] = {}
        self.waiters: dict[int, list[asyncio.Future]] = {}
        # Cars that sent work.request (the auction offers only those: docs/vehicle-protocol.md, "Capacity is
        # measured"), and those whose hardware class is due a check (every HARDWARE_CHECK_INTERVAL_S).
        self.asked: dict[int, object] = {}
        self.to_check: set[int] = set()
        self.checked_at = time.monotonic()
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # a new event loop (a test's): what was pending belonged to the old one
            self.states, self.held_by, self.lost_by, self.waiters, self.task = {}, {}, {}, {}, None
            self.asked, self.to_check = {}, set()
        if self.task is None or self.task.done():
            self.loop, self.task = loop, loop.create_task(self._run())

    def state(self, vehicle_id: int, fields: dict) -> None:
        self._start()
        self.states[vehicle_id] = fields

    def forget(self, vehicle_id: int) -> None:
        """Drop a car's pending state (it was just written directly, and is newer)."""
        self.states.pop(vehicle_id, None)

    def work_requested(self, vehicle_id: int) -> None:
        """The car sent work.request: noted with the next batch, not with a write of its own."""
        self._start()
        self.asked[vehicle_id] = timezone.now()
        self.to_check.add(vehicle_id)

    def heartbeat(self, vehicle_id: int, held: list, lost: list) -> asyncio.Future:
        """Queue a heartbeat (with the leases sent to the car that it does not know); the future gives the
        leases the car must drop."""
        self._start()
        self.held_by[vehicle_id] = held
        self.lost_by.setdefault(vehicle_id, []).extend(lost)
        future = self.loop.create_future()
        self.waiters.setdefault(vehicle_id, []).append(future)
        return future

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(settings.GATEWAY_FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        states, held_by, lost_by, waiters = self.states, self.held_by, self.lost_by, self.waiters
        self.states, self.held_by, self.lost_by, self.waiters = {}, {}, {}, {}
        await self._flush_asked()
        if not states and not held_by:
            return
        try:
            # On PostgreSQL, off the process's shared database thread, which every car's own work queues on,
            # so that the batch (every car's last_seen_at) does not wait behind it. SQLite has one writer: a
            # second writing thread only fought the first for the lock and starved car work for 30 s at a time.
            stale = await database_sync_to_async(services.vehicles_live_record, thread_sensitive=SINGLE_WRITER)(
                states=states, held_by=held_by, lost_by=lost_by)
        except Exception as exc:  # the next heartbeat tries again; telemetry is only a reading
            log.exception("gateway: flushing %d states and %d heartbeats failed", len(states), len(held_by))
            stale, error = {}, exc
        else:
            error = None
        for vehicle_id, futures in waiters.items():
            for future in futures:
                if future.done():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(stale.get(vehicle_id, []))


    async def _flush_asked(self) -> None:
        """Write when cars asked for work (one statement per car, its own transaction:
        fleet.services.vehicles_asked_record), and check the hardware class of those that asked since the last
        check, every HARDWARE_CHECK_INTERVAL_S."""
        asked, self.asked = self.asked, {}
        check: list[int] = []
        if self.to_check and time.monotonic() - self.checked_at >= settings.HARDWARE_CHECK_INTERVAL_S:
            check, self.to_check, self.checked_at = sorted(self.to_check), set(), time.monotonic()
        if not asked and not check:
            return
        try:
            await database_sync_to_async(services.vehicles_asked_record, thread_sensitive=SINGLE_WRITER)(
                asked=asked, check=check)
        except Exception:
            log.exception("gateway: recording %d work requests failed", len(asked))


live_batch = LiveBatch()
