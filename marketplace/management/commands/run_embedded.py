import os
import subprocess
import sys
import threading
from datetime import timedelta

import uvicorn
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand

from billing.localpeer import LocalStripePeer, die_with_parent
from fleet.agent.client import wait_until_up
from fleet.protocol import MAX_MESSAGE_BYTES
from marketplace.scheduler import InProcessScheduler


class Command(BaseCommand):
    help = ("Start the whole product on the embedded profile in one command: migrate, seed the demo, serve HTTP "
            "and websockets, run periodic work in process, and connect a simulated fleet. Ctrl-C stops all of it.")

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--cars", type=int, default=20, help="Simulated cars (0 for none).")
        parser.add_argument("--sim-processes", type=int, default=1, help="Processes the simulated cars share.")
        parser.add_argument("--no-seed", action="store_true", help="No demo accounts, no demo buyer.")

    def handle(self, host, port, cars, sim_processes, no_seed, **options):
        if settings.REDIS_URL:
            self.stderr.write("REDIS_URL is set: run_embedded is the embedded profile; see docs/deploy.md for services.")
        # The profile's files: the local Stripe peer's log and the default SQLite database, which migrate opens
        # first (SQLite creates the file, not its directory). Made here, not when the settings are imported.
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        if not no_seed:
            call_command("seed_demo")
        base = f"http://{host}:{port}"
        # Stripe, offline: the local peer answers the API and signs its webhooks to this server.
        stripe_peer = LocalStripePeer.for_embedded_profile(webhook_url=f"{base}/billing/stripe/webhook/",
                                                           log_path=settings.VAR_DIR / "localstripe.log")
        schedule = dict(settings.CELERY_BEAT_SCHEDULE)
        if not no_seed:
            schedule["demo-buyer"] = {"task": "marketplace.tasks.demo_job_top_up", "schedule": timedelta(seconds=20)}
        scheduler = InProcessScheduler(schedule).start()
        fleet: list[subprocess.Popen] = []
        if cars:  # from the main thread: the child's parent-death signal follows the thread that started it
            fleet.append(subprocess.Popen([sys.executable, "manage.py", "simulate_fleet", "--cars", str(cars),
                                           "--processes", str(sim_processes), "--server", base], cwd=settings.BASE_DIR, env=os.environ.copy(),
                                          preexec_fn=die_with_parent if sys.platform == "linux" else None))

        def announce():
            if wait_until_up(base):
                self.stdout.write(f"\nReady: {base}  (health: {base}/healthz, API schema: {base}/api/schema/)\n")

        threading.Thread(target=announce, daemon=True).start()
        config = uvicorn.Config("marketplace.asgi:application", host=host, port=port, log_level="warning",
                                ws="websockets-sansio", ws_max_size=2 * MAX_MESSAGE_BYTES, lifespan="off",
                                ws_per_message_deflate=False)  # small JSON frames: compression costs more than it saves
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
            if stripe_peer:
                stripe_peer.stop()
            self.stdout.write("Stopped.")
