"""Pacing of Python's garbage collector in a gateway process (one instance, ``collector_pacing``, started by
the first car's session)."""

import asyncio
import gc
import time


class CollectorPacing:
    """Keeps Python's garbage collector from pausing a busy gateway. Every connection's objects live long, and
    a collection of the oldest generation scans all of them: with 8,000 cars on one process each such pass took
    1.0-1.4 s, one came every 5-8 s while cars connected and every 30 s or so while they only sent telemetry,
    and they alone made the telemetry round trip's p99 (tests/bench/gateway.py --diag). So every FREEZE_S
    whatever is alive is frozen (gc.freeze: no longer scanned; it costs nothing, and reference counting still
    frees what is let go), which leaves the collector only the objects of the last second to scan; and every
    FULL_S everything is unfrozen and collected once, so that cyclic garbage (closed connections') is freed.
    That one pass is the only long pause left: about a second an hour at 10,000 cars. One per process, started
    by the first connection (on the running event loop: a test's new loop starts it again)."""

    FREEZE_S = 1.0
    FULL_S = 3600.0

    def __init__(self):
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.task is None or self.task.done():
            self.loop, self.task = loop, loop.create_task(self._run())

    async def _run(self) -> None:
        full_at = time.monotonic()
        while True:
            await asyncio.sleep(self.FREEZE_S)
            if time.monotonic() - full_at >= self.FULL_S:
                gc.unfreeze()
                gc.collect()
                full_at = time.monotonic()
            gc.freeze()


collector_pacing = CollectorPacing()
