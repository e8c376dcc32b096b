"""The gateway process's watch over its sessions' liveness (one instance, ``liveness``, shared by every car's
session in the process): a connection that sends no hello in time, or a car that goes silent, is closed."""

import asyncio
import logging
import time

from django.conf import settings

from fleet import protocol

log = logging.getLogger(__name__)


class Liveness:
    """Closes a session that said no hello within GATEWAY_HELLO_TIMEOUT_S of its handshake
    (CLOSE_HELLO_TIMEOUT), and one that, after its hello, sent no frame at all for GATEWAY_IDLE_TIMEOUT_S
    (CLOSE_IDLE). One periodic sweep per process, a quarter of the shorter timeout apart, so a session is
    closed between its timeout and a quarter later; a frame costs nothing here (a session's ``last_seen`` is
    the stamp its rate limiter keeps anyway) and a car one entry in a set. Started on the running event loop by
    the first connection (a test's new loop starts it again, with none of the old loop's sessions).

    A session offers ``last_seen`` (monotonic seconds) and ``expire(code)``, which closes it."""

    MIN_SWEEP_S = 0.05

    def __init__(self):
        self.waiting: dict = {}  # session -> when it connected (monotonic), until its hello
        self.live: set = set()  # sessions after their hello
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # a new event loop (a test's): the sessions belonged to the old one
            self.waiting, self.live, self.task = {}, set(), None
        if self.task is None or self.task.done():
            self.loop, self.task = loop, loop.create_task(self._run())

    def connected(self, session) -> None:
        self._start()
        self.waiting[session] = time.monotonic()

    def hello(self, session) -> None:
        self.waiting.pop(session, None)
        self.live.add(session)

    def forget(self, session) -> None:
        self.waiting.pop(session, None)
        self.live.discard(session)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(max(self.MIN_SWEEP_S, min(settings.GATEWAY_HELLO_TIMEOUT_S,
                                                          settings.GATEWAY_IDLE_TIMEOUT_S) / 4))
            try:
                self.sweep(time.monotonic())
            except Exception:  # noqa: BLE001 -- a bug here must not stop the watch over every other session
                log.exception("gateway: the liveness sweep failed")

    def sweep(self, now: float) -> None:
        hello_by, idle_since = now - settings.GATEWAY_HELLO_TIMEOUT_S, now - settings.GATEWAY_IDLE_TIMEOUT_S
        late = [session for session, at in self.waiting.items() if at < hello_by]
        idle = [session for session in self.live if session.last_seen < idle_since]
        for session in late:
            self.forget(session)
            session.expire(protocol.CLOSE_HELLO_TIMEOUT)
        for session in idle:
            self.forget(session)
            session.expire(protocol.CLOSE_IDLE)


liveness = Liveness()
