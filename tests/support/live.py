"""Real processes for end-to-end tests: the ASGI server (and, in the services profile, two gateway workers,
a Celery worker and Celery beat) and car agents, all on loopback against the test database."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connection

from billing.localpeer import LocalStripePeer, free_port

ROOT = Path(settings.BASE_DIR)


def test_database_url() -> str:
    """The URL of the database the test run uses, for child processes."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def child_env(**extra) -> dict:
    env = {**os.environ, "DATABASE_URL": test_database_url(), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def wait_for(url: str, timeout: float = 60.0, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


class Processes:
    """Children started by a test, stopped (by their own ids) at the end; their output goes to log files."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir = log_dir
        self.env = env
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], **env) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=child_env(**self.env, **env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.name = name
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop the processes in the reverse of their start: the cars' agents, which a test starts last, are gone
        before the servers they talk to close their sockets (a loaded machine showed a car's "connection lost"
        when both were told at once)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{(self.log_dir / f'{p.name}.log').read_text(errors='replace')[-3000:]}"
                         for p in self.procs)


@contextmanager
def live_product(log_dir: Path, **env):
    """Start the product on the active profile (with extra environment ``env``) and yield (base_url, processes)."""
    port = free_port()
    # The product's Stripe is a local peer on a port of this test's own (the embedded runner starts it; in
    # the services profile this function does), so tests never share one.
    stripe_port = free_port()
    procs = Processes(log_dir, {"STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}", **env})
    python = sys.executable
    stripe_peer = None
    try:
        if settings.REDIS_URL:
            stripe_peer = LocalStripePeer(port=stripe_port, log_path=log_dir / "localstripe.log").start()
            stripe_peer.register_webhook(url=f"http://127.0.0.1:{port}/billing/stripe/webhook/",
                                         secret=settings.STRIPE_WEBHOOK_SECRET)
            # Services profile: two gateway processes behind one address, a Celery worker and Celery beat.
            server = procs.start("gateway", [python, "-m", "uvicorn", "marketplace.asgi:application", "--host", "127.0.0.1",
                                             "--port", str(port), "--workers", "2", "--ws", "websockets-sansio",
                                             "--ws-per-message-deflate", "false", "--ws-max-size", "131072",
                                             "--log-level", "warning"])
            procs.start("worker", [python, "-m", "celery", "-A", "marketplace", "worker", "--concurrency", "2",
                                   "--loglevel", "warning", "--without-gossip", "--without-mingle"])
            procs.start("beat", [python, "-m", "celery", "-A", "marketplace", "beat", "--loglevel", "warning",
                                 "--schedule", str(log_dir / "celerybeat-schedule")])
        else:
            server = procs.start("server", [python, "manage.py", "run_embedded", "--no-seed", "--cars", "0",
                                            "--port", str(port)])
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/healthz", procs=[server])
        yield base, procs
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.stop()
        if stripe_peer:
            stripe_peer.stop()
