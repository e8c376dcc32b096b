"""The fleet simulator's core: simulated cars living a compressed daily routine, each running a real
:class:`~fleet.agent.client.CarAgent` against the gateway, all in one process. No Django here; the
command that creates the vehicles and their tokens lives on the Django side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable

from fleet.agent.client import AuthRefused, CarAgent, Replaced, measure_mops
from fleet.agent.models import MODELS

logger = logging.getLogger("fleet.agent.sim")

DAY_S = 86_400.0
#: Integration step of the simulated battery, in simulated seconds.
STEP_S = 60.0
#: How often run_fleet logs a summary of the fleet, in real seconds.
STATUS_INTERVAL_S = 10.0

HOME, TO_WORK, WORK, TO_HOME = "home", "to_work", "work", "to_home"


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
        return phase == HOME or (phase == WORK and self._work_wifi)

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


async def run_fleet(
    server_url: str,
    cars: list[dict],
    *,
    stop: asyncio.Event,
    time_scale: float = 60.0,
    seed: int = 0,
    executor_threads: int = 2,
) -> list[CarAgent]:
    """Run one agent per car (``{"token", "name", "hardware_watts"}``) until ``stop`` is set.

    The cars share this process's model runners (fleet.agent.models caches one per model and precision), one
    executor of ``executor_threads`` threads, and one throughput measurement divided by the number of cars,
    since they share the CPU: that per-car share is what each reports in its hello. Returns the agents
    (their ``stats`` and ``sensors`` for reports); a car whose token is refused stops alone.
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
        agents = []
        for car in cars:
            sensors = SimulatedSensors(random.Random(rng.getrandbits(64)), car["hardware_watts"], time_scale=time_scale)
            agents.append(
                CarAgent(
                    server_url,
                    car["token"],
                    sensors=sensors,
                    executor=executor,
                    name=car["name"],
                    throughput_mops=per_car,
                    watts=sensors.hardware_watts,
                )
            )
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
        try:
            await asyncio.wait_for(stop.wait(), STATUS_INTERVAL_S)
        except TimeoutError:
            sensors = [agent.sensors for agent in agents]
            logger.info(
                "fleet: %d cars, %d driving, %d on wifi, %d plugged in, %d units done",
                len(agents),
                sum(s.driving for s in sensors),
                sum(s.on_wifi for s in sensors),
                sum(s.plugged_in for s in sensors),
                sum(agent.stats.units_done for agent in agents),
            )
