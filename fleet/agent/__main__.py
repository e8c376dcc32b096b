"""``python -m fleet.agent``: run this car's agent.

    python -m fleet.agent --server http://127.0.0.1:8000 --pair CODE     # first start: pair, save the token
    python -m fleet.agent --server http://127.0.0.1:8000                 # later starts: reuse the saved token
    python -m fleet.agent --server http://127.0.0.1:8000 --token TOKEN   # a token from elsewhere (not saved)
    python -m fleet.agent ... --faults drop_socket=0.05,duplicate=0.05   # inject faults (testing; see client.Faults)

Prints ``agent: paired as vehicle N`` after pairing and ``agent: connected`` on every connection, on stdout.
Exits 0 after SIGINT/SIGTERM, 1 if the server cannot be reached for pairing, 2 for a refused pairing code or a
missing token, 3 when the gateway refuses the token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from fleet.agent.client import AuthRefused, CarAgent, Faults, PairingError, Replaced, StaticSensors, pair

DEFAULT_STATE_FILE = "~/.fleet-agent.json"


def _percent(value: str) -> float:
    pct = float(value)
    if not 0 <= pct <= 100:
        raise argparse.ArgumentTypeError("must be between 0 and 100")
    return pct


def _faults(value: str) -> Faults:
    try:
        return Faults.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fleet.agent", description="Rent this car's idle inference computer.")
    parser.add_argument("--server", required=True, help="marketplace URL, e.g. http://127.0.0.1:8000")
    credential = parser.add_mutually_exclusive_group()
    credential.add_argument("--pair", metavar="CODE", help="pair with this one-time code and save the token")
    credential.add_argument("--token", help="use this device token (not saved)")
    parser.add_argument("--state-file", default=DEFAULT_STATE_FILE, help=f"saved pairing (default {DEFAULT_STATE_FILE})")
    parser.add_argument("--battery", type=_percent, default=80.0, help="battery charge in %% (default 80)")
    parser.add_argument("--plugged-in", action="store_true", help="the car is plugged in")
    parser.add_argument("--wifi", action=argparse.BooleanOptionalAction, default=True, help="the car is on WiFi")
    parser.add_argument("--faults", type=_faults, default=Faults(), metavar="KIND=P,...",
                        help="inject faults for testing, per lease: drop_socket, stall, duplicate, corrupt, late "
                             "(probabilities), stall_s, late_s, seed; e.g. drop_socket=0.05,duplicate=0.05")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def load_state(path: Path) -> dict | None:
    """The saved pairing, or None if there is none."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if not isinstance(state, dict) or not isinstance(state.get("token"), str):
        raise ValueError(f"{path} is not a pairing state file")
    return state


def save_state(path: Path, state: dict) -> None:
    """Write ``{"vehicle_id", "token"}`` atomically, readable by the owner only (0600), and nothing else of
    ``state``: a car never persists a unit's texts or results (docs/vehicle-protocol.md, "Cars never persist
    inputs"); they live in the agent's memory while it holds the lease."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump({"vehicle_id": state["vehicle_id"], "token": state["token"]}, f)
    os.replace(tmp, path)


async def run_agent(server: str, token: str, sensors: StaticSensors, faults: Faults | None = None) -> int:
    """Run until SIGINT/SIGTERM; the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    agent = CarAgent(server, token, sensors=sensors, faults=faults,
                     on_connect=lambda welcome: print("agent: connected", flush=True))
    try:
        await agent.run(stop)
    except (AuthRefused, Replaced) as exc:
        print(f"agent: {exc}", file=sys.stderr, flush=True)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_file = Path(args.state_file).expanduser()
    if args.pair:
        try:
            state = pair(args.server, args.pair)
        except PairingError as exc:
            print(f"agent: pairing refused: {exc}", file=sys.stderr, flush=True)
            return 2
        except OSError as exc:
            print(f"agent: cannot reach {args.server}: {exc}", file=sys.stderr, flush=True)
            return 1
        save_state(state_file, state)
        print(f"agent: paired as vehicle {state['vehicle_id']}", flush=True)
        token = state["token"]
    elif args.token:
        token = args.token
    else:
        try:
            state = load_state(state_file)
        except ValueError as exc:
            print(f"agent: {exc}", file=sys.stderr, flush=True)
            return 2
        if state is None:
            print(f"agent: not paired (no {state_file}); start with --pair CODE", file=sys.stderr, flush=True)
            return 2
        token = state["token"]
    sensors = StaticSensors(battery_pct=args.battery, plugged_in=args.plugged_in, on_wifi=args.wifi)
    return asyncio.run(run_agent(args.server, token, sensors, args.faults))


if __name__ == "__main__":
    sys.exit(main())
