import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import random
import signal

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from fleet import services
from fleet.agent.client import Faults, pair, wait_until_up
from fleet.agent.sim import run_fleet, run_fleet_process
from fleet.models import HardwareGeneration, Vehicle
from marketplace.models import User

SIM_OWNER = "fleet-sim@demo.local"
#: How long stopped child processes get to release their leases and close before they are killed.
CHILD_STOP_TIMEOUT_S = 20.0


def faults_option(value: str) -> Faults:
    try:
        return Faults.parse(value)
    except ValueError as exc:
        raise CommandError(f"--faults: {exc}") from None


class Command(BaseCommand):
    help = ("Run N simulated cars connected to the gateway over real websockets, in this process or split over "
            "several. Cars are registered (once) under a simulation owner and pair like real agents.")

    def add_arguments(self, parser):
        parser.add_argument("--cars", type=int, default=20)
        parser.add_argument("--server", default="http://127.0.0.1:8000")
        parser.add_argument("--time-scale", type=float, default=60.0, help="Simulated seconds per real second.")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--owner", default=SIM_OWNER,
                            help="The simulation owner's e-mail; car i belongs to owner i mod --owners, the "
                                 "first being this address and the others it plus-addressed (fleet-sim+2@...).")
        parser.add_argument("--owners", type=int, default=0, metavar="N",
                            help="Spread the cars over N owners (default 0: one owner per car, as in a real "
                                 "fleet, so that results can be checked by a car of another owner; 1: all cars "
                                 "of one owner, whose checks the platform computes itself).")
        parser.add_argument("--faults", default="", metavar="NAME=VALUE,...",
                            help="Inject faults and cheats (see fleet.agent.client.Faults). Off by default. "
                                 "Faults, probabilities per lease: drop_socket (abort the socket instead of "
                                 "sending a result), stall (sit on it past the lease), duplicate (send it twice), "
                                 "corrupt (a malformed result), late (send it late_s seconds late); with "
                                 "stall_s, late_s and seed. Result cheats, well-formed but wrong, probabilities per "
                                 "result (adding up to 1 at most): random_vectors (random unit vectors), "
                                 "one_vector (the first text's embedding for every text), rotate_rows (row i "
                                 "gets row i+1's embedding), negate (negated embeddings), replay (an earlier "
                                 "unit's embeddings), first_words (embeddings of each text's first 4 words). "
                                 "Car-level: cheat_after=N (honest for its first N results), black_hole=1 "
                                 "(never asks for work), hoard=1 (keeps its leases, never sends or releases "
                                 "them), declare_mops=X (declares X Mops/s for every precision). E.g. "
                                 "drop_socket=0.05,duplicate=0.05 or negate=0.5,replay=0.5,cheat_after=3.")
        parser.add_argument("--cheaters", type=float, default=0.0, metavar="SHARE",
                            help="Give the --faults only to a share of the cars (0 to 1), each car drawn from its "
                                 "seed (so from --seed). Default 0: every car gets them.")
        parser.add_argument("--processes", type=int, default=1,
                            help="Split the cars over this many child processes (default 1: this process).")

    def handle(self, cars, server, time_scale, seed, owner, owners, faults, cheaters, processes, **options):
        faults = faults_option(faults)
        if not 0 <= cheaters <= 1:
            raise CommandError("--cheaters must be a share between 0 and 1")
        if cars < 1:
            raise CommandError("--cars must be 1 or more")
        if processes < 1:
            raise CommandError("--processes must be 1 or more")
        if owners < 0:
            raise CommandError("--owners must be 0 (one per car) or more")
        processes = min(processes, cars)
        if not wait_until_up(server, timeout=120):
            raise CommandError(f"{server} did not answer /healthz")
        # Each car gets its seed here, so that it behaves the same whichever process runs it.
        car_seeds = random.Random(seed)
        fleet = [{**car, "token": pair(server, car.pop("code"))["token"], "seed": car_seeds.getrandbits(64)}
                 for car in self._provision(cars, seed, owner, owners or cars)]
        self.stdout.write(f"simulate_fleet: {len(fleet)} cars paired with {server}"
                          + (f", faults {faults}" if faults.enabled else "")
                          + (f" for a share {cheaters:g} of them" if faults.enabled and cheaters else ""))
        run_options = {"time_scale": time_scale, "seed": seed, "faults": faults if faults.enabled else None,
                       "cheaters": cheaters}
        if processes == 1:
            self._run_here(server, fleet, run_options)
        else:
            self._run_children(server, fleet, processes, run_options)

    def _run_here(self, server: str, fleet: list[dict], run_options: dict) -> None:
        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await run_fleet(server, fleet, stop=stop, **run_options)

        asyncio.run(main())

    def _run_children(self, server: str, fleet: list[dict], processes: int, run_options: dict) -> None:
        """Run the fleet in ``processes`` children (cars dealt round robin), each with its own executor and models.

        The children are spawned (not forked: they need nothing of Django) and get their cars' tokens as
        arguments through multiprocessing's pipe, never on a command line. They die with this process: each
        watches a pipe only this process holds open (end of file when it exits, even when killed), and
        SIGINT/SIGTERM here stop them cleanly (they release their leases), then kill them after
        CHILD_STOP_TIMEOUT_S.
        """
        context = multiprocessing.get_context("spawn")
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        children, lifelines = [], []
        for i in range(processes):
            label = f"{i + 1}/{processes}"
            reader, writer = context.Pipe(duplex=False)
            child = context.Process(
                target=run_fleet_process,
                args=(server, fleet[i::processes]),
                kwargs={"parent": reader, "label": label, "log_level": log_level, **run_options},
                name=f"simulate_fleet {label}",
                daemon=True,
            )
            child.start()
            reader.close()
            children.append(child)
            lifelines.append(writer)
        self.stdout.write(f"simulate_fleet: {len(fleet)} cars in {processes} processes "
                          f"({', '.join(str(c.pid) for c in children)})")
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt
        try:
            running = {child.sentinel: child for child in children}
            while running:
                for sentinel in multiprocessing.connection.wait(list(running)):
                    child = running.pop(sentinel)
                    if child.exitcode:
                        self.stderr.write(f"simulate_fleet: {child.name} exited with status {child.exitcode}")
        except KeyboardInterrupt:
            for child in children:
                if child.is_alive():
                    child.terminate()  # SIGTERM: the child stops its cars cleanly
            for child in children:
                child.join(CHILD_STOP_TIMEOUT_S)
                if child.is_alive():
                    child.kill()
                    child.join()
        finally:
            signal.signal(signal.SIGTERM, previous)
            for writer in lifelines:
                writer.close()
        failed = [child.name for child in children if child.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        if failed:
            raise CommandError(f"{len(failed)} of {processes} simulator processes failed: {', '.join(failed)}")

    @transaction.atomic
    def _provision(self, count: int, seed: int, owner_email: str, owners: int) -> list[dict]:
        """Register ``count`` cars with varied hardware and owner limits, spread over ``owners`` owners, and a
        fresh pairing code for each."""
        rng = random.Random(seed)
        local, _, domain = owner_email.partition("@")
        emails = [owner_email] + [f"{local}+{k}@{domain}" for k in range(2, owners + 1)]
        hardware = {hw.code: hw for hw in HardwareGeneration.objects.filter(code__in=["HW3", "HW4"])}
        cars = []
        for i in range(1, count + 1):
            email = emails[(i - 1) % owners]
            owner = User.objects.filter(email=email).first() or User.objects.create_user(
                email=email, password=None, role=User.Role.OWNER)
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
