import os
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta

import uvicorn
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from fleet.protocol import MAX_MESSAGE_BYTES
from marketplace.scheduler import InProcessScheduler


def wait_healthy(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


class Command(BaseCommand):
    help = ("Start the whole product on the embedded profile in one command: migrate, seed the demo, serve HTTP "
            "and websockets, run periodic work in process, and connect a simulated fleet. Ctrl-C stops all of it.")

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--cars", type=int, default=20, help="Simulated cars (0 for none).")
        parser.add_argument("--no-seed", action="store_true", help="No demo accounts, no demo buyer.")

    def handle(self, host, port, cars, no_seed, **options):
        if settings.REDIS_URL:
            self.stderr.write("REDIS_URL is set: run_embedded is the embedded profile; see docs/deploy.md for services.")
        call_command("migrate", interactive=False, verbosity=0)
        if not no_seed:
            call_command("seed_demo")
        base = f"http://{host}:{port}"
        schedule = dict(settings.CELERY_BEAT_SCHEDULE)
        if not no_seed:
            schedule["demo-buyer"] = {"task": "marketplace.tasks.demo_job_top_up", "schedule": timedelta(seconds=20)}
        scheduler = InProcessScheduler(schedule).start()
        fleet: list[subprocess.Popen] = []

        def start_fleet():
            if wait_healthy(f"{base}/healthz"):
                self.stdout.write(f"\nReady: {base}  (health: {base}/healthz, API schema: {base}/api/schema/)\n")
                if cars:
                    fleet.append(subprocess.Popen([sys.executable, "manage.py", "simulate_fleet", "--cars", str(cars),
                                                   "--server", base], cwd=settings.BASE_DIR, env=os.environ.copy()))

        threading.Thread(target=start_fleet, daemon=True).start()
        config = uvicorn.Config("marketplace.asgi:application", host=host, port=port, log_level="warning",
                                ws="websockets-sansio", ws_max_size=2 * MAX_MESSAGE_BYTES, lifespan="off")
        try:
            uvicorn.Server(config).run()  # returns on Ctrl-C / SIGTERM
        finally:
            for process in fleet:
                process.terminate()
            for process in fleet:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            scheduler.stop()
            self.stdout.write("Stopped.")
