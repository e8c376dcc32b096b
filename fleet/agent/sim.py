"""The fleet simulator's core: simulated cars living a compressed daily routine, each running a real
:class:`~fleet.agent.client.CarAgent` against the gateway, many per process. No Django here; the
command that creates the vehicles and their tokens (and splits the fleet over processes) lives on the
Django side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from fleet.agent.client import (
    AuthRefused,
    CarAgent,
    Faults,
    Replaced,
    measure_mops,
    wait_event,
)
from fleet.agent.models import MODELS

logger = logging.getLogger("fleet.agent.sim")

DAY_S = 86_400.0
#: Integration step of the simulated battery, in simulated seconds.
STEP_S = 60.0
#: How often run_fleet logs a summary of the fleet, in real seconds.
STATUS_INTERVAL_S = 10.0

HOME, TO_WORK, WORK, TO_HOME = "home", "to_work", "work", "to_home"
STARLINK, LINE = "starlink", "fibre_cable"


class SimulatedSensors:
    """A commuter's electric car, its day compressed by ``time_scale`` (60: one real second is one simulated
    minute, a day lasts 24 real minutes).

    The routine and its parameters, per car (drawn from ``rng``) and per day (a little jitter):

    * Two commutes a day of ``commute_min`` (25 simulated minutes +- 5 per car): the mean one-way travel time to
      work in the US is about 26-27 minutes (Census ACS). Leaves home around 07:30 (+- 45 min per car, the
      morning peak is 7-8 am), stays at work 9 hours (8 hours of work and lunch), +- 10 minutes each day.
      So the car drives about 50 minutes a day and is parked about 96 % of the time: cars are parked about
      95 % of the time (Shoup, *The High Cost of Free Parking*).
    * Driving at ``speed_kmh`` (40 km/h average, mixed urban and suburban commute, about 17 km each way) using
      ``kwh_per_100km`` (15 kWh/100 km, a typical mid-size EV): 6 kW, 2.5 kWh per commute.
    * ``battery_kwh`` 75 kWh (a typical long-range mid-size EV), starting between 40 and 90 %.
    * Home, overnight: on the home WiFi. Plugged in on arrival with probability ``plug_probability`` (0.6,
      an assumption: most EV charging happens at home, but many owners plug in only every few nights) and
      always below 50 %; charges at ``charger_kw`` (7.2 kW, a 32 A / 240 V Level 2 home charger) up to
      ``charge_limit_pct`` (90 %, the usual daily charge limit); unplugged when leaving.
    * Work: no charger; WiFi only for a share ``work_wifi_share`` of the cars (0.3, an assumption).
    * Inference work drains the battery at the computer's draw: ``hardware_watts`` is the car's computer under
      load (its hardware generation's figure), which run_fleet gives the agent as its ``watts``; the agent
      reports real compute seconds to :meth:`on_work`, scaled here to simulated time.
    * WiFi comes and goes: outage episodes (the router restarts, the line drops, the car sits at the edge of
      the garage's coverage) start on average once every ``wifi_outage_every_h`` simulated hours (4, start to
      start, a Poisson process; an assumption) and last ``wifi_outage_minutes`` (1 to 15 simulated minutes,
      uniform; an assumption). ``on_wifi`` is false during one; it matters only while parked on WiFi.
      ``wifi_outage_every_h=None`` turns outages off.
    * Uplink, ``uplink_kbps``, reported in the agent's hello: a share ``starlink_share`` of the homes (0.1, an
      assumption) is on a Starlink-like satellite link uploading 5-20 Mbps (uniform; DESIGN: Starlink
      25-220 Mbps down, 5-20 up); the others are on a fibre or cable line uploading 20 Mbps (a common cable
      plan's upload) to 1 Gbps (symmetric fibre), log-uniform (an assumption), capped at about 720 Mbps, the
      real-world ceiling of the car's 802.11ac home WiFi (DESIGN). The workplace WiFi is taken to be no
      slower, so a car reports its home figure everywhere. ``link`` says which kind it drew.

    The car starts at a random time of its day (``start_s``), so that at any moment most of a fleet is parked.
    ``clock`` gives real seconds (tests pass a fake one).
    """

    def __init__(
        self,
        rng: random.Random,
        hardware_watts: float,
        battery_kwh: float = 75.0,
        *,
        time_scale: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        start_s: float | None = None,
        commute_min: float = 25.0,
        speed_kmh: float = 40.0,
        kwh_per_100km: float = 15.0,
        charger_kw: float = 7.2,
        charge_limit_pct: float = 90.0,
        plug_probability: float = 0.6,
        work_wifi_share: float = 0.3,
        wifi_outage_every_h: float | None = 4.0,
        wifi_outage_minutes: tuple[float, float] = (1.0, 15.0),
        starlink_share: float = 0.1,
    ):
        self.hardware_watts = hardware_watts
        self.battery_kwh = battery_kwh
        self.time_scale = time_scale
        self.charger_kw = charger_kw
        self.charge_limit_pct = charge_limit_pct
        self.plug_probability = plug_probability
        self.drive_kw = kwh_per_100km / 100 * speed_kmh
        self._rng = rng
        self._clock = clock
        self._t0 = clock()
        self._plan_seed = rng.getrandbits(64)
        self._commute_s = max(10.0, rng.gauss(commute_min, 5.0)) * 60
        self._leave_home_s = min(max(rng.gauss(7.5 * 3600, 45 * 60), 5.5 * 3600), 9.5 * 3600)
        self._work_wifi = rng.random() < work_wifi_share
        self._start_s = rng.uniform(0, DAY_S) if start_s is None else start_s
        self._t = self._start_s
        self._phase = self._phase_at(self._t)
        self.battery_pct = rng.uniform(40.0, 90.0)
        self._plugged = self._phase == HOME and self._decide_plug()
        self.work_kwh = 0.0  # energy used by inference
        self.link = STARLINK if rng.random() < starlink_share else LINE
        if self.link == STARLINK:
            self.uplink_kbps = round(rng.uniform(5_000, 20_000))
        else:
            self.uplink_kbps = min(720_000, round(math.exp(rng.uniform(math.log(20_000), math.log(1_000_000)))))
        # WiFi outages: their own random stream (seeded from the car's), so they do not shift the routine's.
        self._outage_rng = random.Random(self._plan_seed + 1)
        self._outage_every_s = wifi_outage_every_h * 3600 if wifi_outage_every_h else None
        self._outage_s = (wifi_outage_minutes[0] * 60, wifi_outage_minutes[1] * 60)
        self._outage = self._next_outage(self._start_s) if self._outage_every_s else None

    @property
    def sim_s(self) -> float:
        """Simulated seconds since midnight of day 0."""
        return self._start_s + (self._clock() - self._t0) * self.time_scale

    @property
    def phase(self) -> str:
        self._advance()
        return self._phase

    @property
    def driving(self) -> bool:
        return self.phase in (TO_WORK, TO_HOME)

    @property
    def plugged_in(self) -> bool:
        self._advance()
        return self._plugged

    @property
    def charging_kw(self) -> float:
        """The home charger's power while plugged in below the charge limit, else 0."""
        return self.charger_kw if self.plugged_in and self.battery_pct < self.charge_limit_pct else 0.0

    @property
    def on_wifi(self) -> bool:
        phase = self.phase
        return (phase == HOME or (phase == WORK and self._work_wifi)) and not self.wifi_outage

    @property
    def wifi_outage(self) -> bool:
        """Whether a WiFi outage episode is going on now (wherever the car is)."""
        self._advance()
        if self._outage is None:
            return False
        while self._t >= self._outage[1]:
            self._outage = self._next_outage(self._outage[1])
        return self._outage[0] <= self._t

    def on_work(self, seconds: float, watts: float) -> None:
        """``seconds`` of real compute at ``watts``, i.e. ``seconds * time_scale`` simulated."""
        self._advance()
        kwh = watts * seconds * self.time_scale / 3.6e6
        self.work_kwh += kwh
        self._add_kwh(-kwh)

    def _day_plan(self, day: int) -> tuple[float, float, float, float]:
        """Leave home, arrive at work, leave work, arrive home: seconds after midnight of ``day``."""
        jitter = random.Random(self._plan_seed + day)
        leave_home = self._leave_home_s + jitter.gauss(0, 600)
        leave_work = leave_home + self._commute_s + 9 * 3600 + jitter.gauss(0, 600)
        return leave_home, leave_home + self._commute_s, leave_work, leave_work + self._commute_s

    def _phase_at(self, t: float) -> str:
        day, tod = divmod(t, DAY_S)
        leave_home, arrive_work, leave_work, arrive_home = self._day_plan(int(day))
        if tod < leave_home or tod >= arrive_home:
            return HOME
        if tod < arrive_work:
            return TO_WORK
        return WORK if tod < leave_work else TO_HOME

    def _next_outage(self, after: float) -> tuple[float, float]:
        """The next WiFi outage after simulated time ``after``: (start, end). Gaps are exponential with the mean
        that makes the mean start-to-start interval ``wifi_outage_every_h``."""
        shortest, longest = self._outage_s
        mean_gap = max(1.0, self._outage_every_s - (shortest + longest) / 2)
        start = after + self._outage_rng.expovariate(1 / mean_gap)
        return start, start + self._outage_rng.uniform(shortest, longest)

    def _decide_plug(self) -> bool:
        return self.battery_pct < 50.0 or self._rng.random() < self.plug_probability

    def _add_kwh(self, kwh: float) -> None:
        self.battery_pct = min(100.0, max(0.0, self.battery_pct + kwh / self.battery_kwh * 100))

    def _advance(self) -> None:
        """Integrate the battery and the routine up to the current simulated time."""
        now = self.sim_s
        while self._t < now:
            dt = min(STEP_S, now - self._t)
            if self._phase in (TO_WORK, TO_HOME):
                self._add_kwh(-self.drive_kw * dt / 3600)
            elif self._plugged and self.battery_pct < self.charge_limit_pct:
                room = (self.charge_limit_pct - self.battery_pct) / 100 * self.battery_kwh
                self._add_kwh(min(self.charger_kw * dt / 3600, room))
            self._t += dt
            phase = self._phase_at(self._t)
            if phase != self._phase:
                if phase == HOME:
                    self._plugged = self._decide_plug()
                elif self._phase == HOME:
                    self._plugged = False
                self._phase = phase


def is_cheater(car_seed: int, share: float) -> bool:
    """Whether the car of seed ``car_seed`` is drawn as one of the cheaters, each car with probability
    ``share`` (0 to 1); from the car's seed alone, so that a car is the same whichever process runs it."""
    if not 0 <= share <= 1:
        raise ValueError(f"the cheaters' share must be between 0 and 1, got {share!r}")
    return random.Random(f"cheater/{car_seed}").random() < share


async def run_fleet(
    server_url: str,
    cars: list[dict],
    *,
    stop: asyncio.Event,
    time_scale: float = 60.0,
    seed: int = 0,
    executor_threads: int = 2,
    faults: Faults | None = None,
    cheaters: float = 0.0,
    telemetry_interval_s: float = 5.0,
    agents: list[CarAgent] | None = None,
) -> list[CarAgent]:
    """Run one agent per car (``{"token", "name", "hardware_watts"}``, optionally ``"seed"``) until ``stop``
    is set.

    The cars share this process's model runners (fleet.agent.models caches one per model and precision), one
    executor of ``executor_threads`` threads, and one throughput measurement divided by the number of cars,
    since they share the CPU: that per-car share is what each reports in its hello. A car's own ``seed``
    (else the next draw from ``seed``) fixes its routine and its fault draws, so a car behaves the same
    whichever process runs it. ``faults`` (faults and cheats alike) apply to every car when ``cheaters`` is 0,
    else only to the cars :func:`is_cheater` draws with probability ``cheaters``; each car that gets them has
    its own fault seed derived from the car's. An honest car's agent has ``faults`` None.
    Returns the agents (their ``stats`` and ``sensors`` for reports); a car whose token is refused stops alone.
    A caller's ``agents`` list is filled as soon as the agents exist, so their stats can be read even when
    the run is cut short.
    """
    if not cars:
        return []
    rng = random.Random(seed)
    executor = concurrent.futures.ThreadPoolExecutor(executor_threads, thread_name_prefix="fleet-sim")
    try:
        loop = asyncio.get_running_loop()
        measured = await loop.run_in_executor(executor, measure_mops, list(MODELS))
        per_car = {precision: max(1, mops // len(cars)) for precision, mops in measured.items()}
        logger.info("fleet: measured %s Mops/s, %s per car for %d cars", measured, per_car, len(cars))
        agents = agents if agents is not None else []
        for car in cars:
            car_seed = car["seed"] if "seed" in car else rng.getrandbits(64)
            sensors = SimulatedSensors(random.Random(car_seed), car["hardware_watts"], time_scale=time_scale)
            car_faults = None
            if faults is not None and faults.enabled and (cheaters == 0 or is_cheater(car_seed, cheaters)):
                fault_seed = random.Random(f"faults/{faults.seed}/{car_seed}").getrandbits(64)
                car_faults = dataclasses.replace(faults, seed=fault_seed)
            agents.append(
                CarAgent(
                    server_url,
                    car["token"],
                    sensors=sensors,
                    executor=executor,
                    name=car["name"],
                    telemetry_interval_s=telemetry_interval_s,
                    throughput_mops=per_car,
                    watts=sensors.hardware_watts,
                    faults=car_faults,
                )
            )
        if faults is not None and faults.enabled:
            logger.info("fleet: %d of %d cars get the faults %s",
                        sum(agent.faults is not None for agent in agents), len(agents), faults)
        reporter = asyncio.create_task(_report(agents, stop))
        outcomes = await asyncio.gather(*(agent.run(stop) for agent in agents), return_exceptions=True)
        reporter.cancel()
        for agent, outcome in zip(agents, outcomes):
            if isinstance(outcome, (AuthRefused, Replaced)):
                logger.error("fleet: %s stopped: %s", agent.name, outcome)
            elif isinstance(outcome, BaseException):
                logger.error("fleet: %s failed", agent.name, exc_info=outcome)
        return agents
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


async def _report(agents: list[CarAgent], stop: asyncio.Event) -> None:
    """Log a one-line summary of the fleet every STATUS_INTERVAL_S."""
    while not stop.is_set():
        if not await wait_event(stop, STATUS_INTERVAL_S):
            sensors = [agent.sensors for agent in agents]
            faults: dict[str, int] = {}
            for agent in agents:
                for kind, count in agent.stats.faults_injected.items():
                    faults[kind] = faults.get(kind, 0) + count
            logger.info(
                "fleet: %d cars, %d driving, %d on wifi, %d plugged in, %d units done, %d reconnects%s",
                len(agents),
                sum(s.driving for s in sensors),
                sum(s.on_wifi for s in sensors),
                sum(s.plugged_in for s in sensors),
                sum(agent.stats.units_done for agent in agents),
                sum(agent.stats.reconnects for agent in agents),
                f", faults injected {faults}" if faults else "",
            )


def run_fleet_process(
    server_url: str, cars: list[dict], *, parent: Connection, label: str, log_level: str = "INFO", **options
) -> None:
    """Entry point of one simulator child process (started with multiprocessing's ``spawn``): run ``cars``
    with :func:`run_fleet` (``options`` are its keyword arguments) until SIGINT or SIGTERM, or until the
    parent goes away. ``parent`` is the reading end of a pipe whose writing end only the parent holds: it
    becomes readable (end of file) when the parent exits, however it exits."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s [{label}]: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def parent_gone() -> None:
            loop.remove_reader(parent.fileno())
            logger.warning("fleet: the parent process is gone; stopping")
            stop.set()

        loop.add_reader(parent.fileno(), parent_gone)
        await run_fleet(server_url, cars, stop=stop, **options)

    asyncio.run(main())
