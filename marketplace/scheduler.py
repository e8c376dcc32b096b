"""The embedded profile's periodic scheduler: a daemon thread that runs the same ``CELERY_BEAT_SCHEDULE``
that Celery beat runs in the services profile, so periodic work has one definition and two drivers."""

import logging
import threading
import time

from kombu.utils.imports import symbol_by_name
from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)


class InProcessScheduler:
    def __init__(self, schedule: dict | None = None):
        self.schedule = schedule if schedule is not None else settings.CELERY_BEAT_SCHEDULE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> "InProcessScheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        due = {name: time.monotonic() for name in self.schedule}
        while not self._stop.is_set():
            now = time.monotonic()
            for name, entry in self.schedule.items():
                if now < due[name]:
                    continue
                due[name] = now + entry["schedule"].total_seconds()
                try:
                    symbol_by_name(entry["task"]).apply(throw=True)
                except Exception:  # a failed run is logged; the next interval runs again
                    log.exception("periodic task %s failed", name)
                finally:
                    close_old_connections()
            self._stop.wait(max(0.05, min(due.values()) - time.monotonic()))
