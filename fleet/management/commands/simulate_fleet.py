import asyncio
import random
import signal

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from fleet import services
from fleet.agent.client import pair, wait_until_up
from fleet.agent.sim import run_fleet
from fleet.models import HardwareGeneration, Vehicle
from marketplace.models import User

SIM_OWNER = "fleet-sim@demo.local"


class Command(BaseCommand):
    help = ("Run N simulated cars in this process, connected to the gateway over real websockets. Cars are "
            "registered (once) under a simulation owner and pair like real agents.")

    def add_arguments(self, parser):
        parser.add_argument("--cars", type=int, default=20)
        parser.add_argument("--server", default="http://127.0.0.1:8000")
        parser.add_argument("--time-scale", type=float, default=60.0, help="Simulated seconds per real second.")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--owner", default=SIM_OWNER)

    def handle(self, cars, server, time_scale, seed, owner, **options):
        if not wait_until_up(server, timeout=120):
            raise CommandError(f"{server} did not answer /healthz")
        fleet = [{**car, "token": pair(server, car.pop("code"))["token"]} for car in self._provision(cars, seed, owner)]
        self.stdout.write(f"simulate_fleet: {len(fleet)} cars paired with {server}")

        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await run_fleet(server, fleet, stop=stop, time_scale=time_scale, seed=seed)

        asyncio.run(main())

    @transaction.atomic
    def _provision(self, count: int, seed: int, owner_email: str) -> list[dict]:
        """Register ``count`` cars with varied hardware and owner limits, and a fresh pairing code for each."""
        rng = random.Random(seed)
        owner = User.objects.filter(email=owner_email).first() or User.objects.create_user(
            email=owner_email, password=None, role=User.Role.OWNER)
        hardware = {hw.code: hw for hw in HardwareGeneration.objects.filter(code__in=["HW3", "HW4"])}
        cars = []
        for i in range(1, count + 1):
            name = f"Sim car {i:03d}"
            vehicle = Vehicle.objects.filter(owner=owner, name=name, removed_at=None).first()
            if vehicle is None:
                vehicle, code = services.vehicle_create(owner=owner, name=name,
                                                        hardware=hardware["HW4" if rng.random() < 0.6 else "HW3"])
                floor = rng.choice([20, 25, 30, 40])
                services.policy_update(vehicle=vehicle, battery_floor_pct=floor, battery_resume_pct=floor + 5,
                                       wifi_only=rng.random() < 0.8, reserve_price_micros=rng.choice([0, 100_000, 250_000, 500_000]))
            else:
                code = services.pairing_code_issue(vehicle=vehicle)
            cars.append({"name": name, "code": code, "hardware_watts": vehicle.hardware.watts})
        return cars
