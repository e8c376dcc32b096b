"""Benchmark: the vehicle gateway (fleet.gateway) as ONE uvicorn process, with real websockets.

A throwaway database (PostgreSQL on 127.0.0.1 unless DATABASE_URL names another server; a temporary
SQLite file only if PostgreSQL is unreachable) with N cars and their device tokens, then three phases, each
against a fresh server process and driven by the same load client (spawned processes, uvloop, ``gc.freeze``
and the collector off while measuring):

1. Ceiling: a bare ``websockets.asyncio.server.serve`` JSON server (welcome on connect, parses every frame
   and answers telemetry with ``{"v":1,"type":"ack","seq":n}``): telemetry messages per second.
2. Connections: N cars connect in bounded batches (hello, welcome, a first telemetry and its ack), then send telemetry with a ``seq``
   every 10 s, start times spread uniformly over the period, for a bounded hold window; the round trip
   telemetry -> ack, cars held, failed connects, lost (no ack within the timeout), closes, and the gateway's
   memory per car (VmRSS after connecting minus before, divided by the cars held).
3. Message rate: many connections pipelining telemetry, each below the gateway's per-connection limit
   (fleet.protocol.RATE_*), for a bounded window: acks per second, against the ceiling of phase 1
   (``ratio_vs_bare``), and the server's CPU time per message against the bare server's (``cpu_ratio_vs_bare``:
   on a shared machine the load clients and other work take turns with the server, and this figure moves less).
   When ``bare_capped_by_offer`` is true the bare server answered everything offered: its real ceiling is
   higher, and ``ratio_vs_bare`` flatters the gateway (raise --rate-conns).

The gateway runs as docs/deploy.md runs it, in one process: uvicorn with websockets-sansio, 128 KiB frames and
no permessage-deflate (the client offers it, as the agent does; --deflate makes both servers accept it),
DJANGO_DEBUG=false, the embedded channel layer (or channels-redis on redis://127.0.0.1:6379/14 with --redis).
Its database is dropped at the end. Progress goes to stderr; the output ends with one JSON line.

Run alone: python -m tests.bench.gateway [--quick] [--cars 10000] [--hold-s 35] [--rate-conns 800] [--rate-s 10]
           [--redis] [--deflate] [--py-spy /path/to/py-spy --py-spy-out /tmp/gateway.txt [--py-spy-phase rate|hold]]
           [--diag /tmp/prefix]  (GC pauses and event-loop stalls inside the gateway, with stacks)
"""

import argparse
import asyncio
import collections
import gc
import hashlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.bench.support import ROOT, free_port

DEFAULT_PG = "postgres://postgres@127.0.0.1:5432/postgres"
REDIS_BENCH_URL = "redis://127.0.0.1:6379/14"

PERIOD_S = 10.0  # telemetry interval of each car in the connections phase
ACK_TIMEOUT_S = 10.0  # a telemetry unanswered this long is lost
WARM_CARS = 20  # connect, hello, one telemetry, close: before the memory baseline
CONN_RATE = 40.0  # messages/s per connection in the rate phase: below fleet.protocol.RATE_PER_S (50)
CONN_BURST = 10  # ... and far below RATE_BURST (100)
WINDOW = 8  # unanswered telemetry per connection in the rate phase (pipelining)

HELLO = json.dumps({"v": 1, "type": "hello", "agent_version": "bench", "runtimes": ["all-minilm-l6-v2"],
                    "throughput_mops": {"int8": 100000}}, separators=(",", ":"))
TELEMETRY = ('{"v":1,"type":"telemetry","battery_pct":80.0,"driving":false,"plugged_in":true,"on_wifi":true,'
             '"seq":%d}')
WELCOME = '{"v":1,"type":"welcome","vehicle_id":0,"heartbeat_s":5,"lease_ttl_s":30,"max_inflight":2}'


def _log(*parts) -> None:
    print("[gateway-bench]", *parts, file=sys.stderr, flush=True)


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _new_loop():
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# --- the process under test: reading its memory and CPU -------------------------------------------------

def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


# --- load client (runs in spawned processes) ------------------------------------------------------------

class _Stats:
    def __init__(self):
        self.failed = collections.Counter()  # connect failures by cause
        self.closes = collections.Counter()  # closes by the server while measuring, by code
        self.errors = collections.Counter()  # gateway "error" messages by code
        self.other = collections.Counter()  # other message types received
        self.rtts: list[float] = []
        self.lag: list[float] = []  # how late the client sent against its schedule
        self.sent = self.acked = self.late = self.in_window = self.unknown_acks = self.send_failed = 0
        self.measuring = False


async def _connect_all(url: str, cars: list, cfg: dict, stats: _Stats, on_open) -> dict:
    """Connect every car (at most cfg["connect_concurrency"] at a time): handshake, hello, welcome, telemetry, ack."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    gate = asyncio.Semaphore(cfg["connect_concurrency"])
    conns = {}

    async def one(idx: int, token: str):
        async with gate:
            try:
                ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                                   open_timeout=cfg["open_timeout"], ping_interval=None, close_timeout=1,
                                   max_queue=64)  # offers permessage-deflate, as the agent does
            except InvalidStatus as exc:
                stats.failed[f"http_{exc.response.status_code}"] += 1
                return
            except TimeoutError:
                stats.failed["handshake_timeout"] += 1
                return
            except OSError as exc:
                stats.failed[f"os_{exc.errno}"] += 1
                return
            except (InvalidHandshake, ConnectionClosed) as exc:
                stats.failed[type(exc).__name__] += 1
                return
            # As the agent does: hello, then telemetry at once. The welcome comes on accept or in answer to the
            # hello, depending on the gateway's version; the first telemetry of a session may cost a database
            # write (it changes the car's decision): it belongs to connecting, not to the measured window.
            step = "no_welcome"
            try:
                await ws.send(HELLO)
                async with asyncio.timeout(cfg["open_timeout"]):
                    while json.loads(await ws.recv()).get("type") != "welcome":
                        pass
                    step = "no_first_ack"
                    await ws.send(TELEMETRY % 0)
                    while json.loads(await ws.recv()).get("type") != "ack":
                        pass
            except (TimeoutError, ConnectionClosed, ValueError):
                stats.failed[step] += 1
                ws.transport.abort()
                return
            conns[idx] = ws
            on_open(idx, ws)

    tasks = [asyncio.ensure_future(one(idx, token)) for idx, token in cars]
    done, pending = await asyncio.wait(tasks, timeout=cfg["connect_deadline_s"])
    for task in pending:
        task.cancel()
    if pending:
        stats.failed["connect_deadline"] += len(pending)
        await asyncio.wait(pending, timeout=5)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            stats.failed[type(task.exception()).__name__] += 1
    return conns


async def _reader(idx: int, ws, pending: dict, stats: _Stats, on_ack=None):
    """Every message the server sends to one connection: acks close their telemetry's round trip."""
    from websockets.exceptions import ConnectionClosed

    try:
        async for text in ws:
            msg = json.loads(text)
            kind = msg.get("type")
            if kind == "ack":
                sent_at = pending.pop((idx, msg.get("seq")), None)
                if sent_at is None:
                    stats.unknown_acks += 1
                    continue
                now = time.monotonic()
                rtt = now - sent_at
                stats.rtts.append(rtt)
                stats.acked += 1
                if rtt > ACK_TIMEOUT_S:
                    stats.late += 1
                if on_ack is not None:
                    on_ack(now)
            elif kind == "error":
                stats.errors[str(msg.get("code"))] += 1
            else:
                stats.other[str(kind)] += 1
    except ConnectionClosed:
        pass
    except ValueError:
        stats.errors["client_bad_json"] += 1
    if stats.measuring:
        stats.closes[str(ws.close_code)] += 1


async def _drain(pending: dict, until: float):
    while pending and time.monotonic() < until:
        await asyncio.sleep(0.05)


async def _hold(conns: dict, cfg: dict, t0: float, t_end: float, stats: _Stats, pending: dict):
    """Each car sends telemetry every PERIOD_S from t0 + its phase until t_end."""
    from websockets.exceptions import ConnectionClosed

    n_total, period = cfg["n_total"], cfg["period_s"]

    async def car(idx: int, ws):
        when, seq = t0 + (idx + 0.5) / n_total * period, 0
        while when < t_end:
            delay = when - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            stats.lag.append(now - when)
            seq += 1
            pending[(idx, seq)] = now
            try:
                await ws.send(TELEMETRY % seq)
            except ConnectionClosed:
                pending.pop((idx, seq), None)
                stats.send_failed += 1
                return
            stats.sent += 1
            when += period

    await asyncio.gather(*(car(idx, ws) for idx, ws in conns.items()))


async def _rate(conns: dict, cfg: dict, t0: float, t_end: float, stats: _Stats, pending: dict, windows: dict):
    """Each connection pipelines telemetry (at most WINDOW unanswered), paced below the gateway's limit."""
    from websockets.exceptions import ConnectionClosed

    rate, tolerance = cfg["conn_rate"], (cfg["conn_burst"] - 1) / cfg["conn_rate"]

    async def conn(idx: int, ws):
        window = windows[idx]
        tat, seq = t0 + random.random() / rate, 0  # theoretical arrival time (GCRA pacing)
        while True:
            await window.acquire()
            now = time.monotonic()
            if tat - tolerance > now:
                await asyncio.sleep(tat - tolerance - now)
                now = time.monotonic()
            if now >= t_end:
                return
            tat = max(tat, now) + 1 / rate
            seq += 1
            pending[(idx, seq)] = now
            try:
                await ws.send(TELEMETRY % seq)
            except ConnectionClosed:
                pending.pop((idx, seq), None)
                stats.send_failed += 1
                return
            stats.sent += 1

    await asyncio.gather(*(conn(idx, ws) for idx, ws in conns.items()))


def _recv(pipe, timeout: float):
    if not pipe.poll(timeout):
        raise TimeoutError("no word from the other side of the pipe")
    try:
        return pipe.recv()
    except EOFError:
        raise RuntimeError("the other side of the pipe exited") from None


async def _client(mode: str, url: str, cars: list, cfg: dict, pipe) -> None:
    loop = asyncio.get_running_loop()
    stats, pending, readers, windows = _Stats(), {}, [], {}
    count_from = t_end = 0.0

    def on_ack_rate(now: float):
        if count_from <= now <= t_end:
            stats.in_window += 1

    def on_open(idx, ws):
        if mode == "rate":
            windows[idx] = window = asyncio.Semaphore(WINDOW)
            on_ack = lambda now: (window.release(), on_ack_rate(now))  # noqa: E731
        else:
            on_ack = None
        readers.append(asyncio.ensure_future(_reader(idx, ws, pending, stats, on_ack)))

    started = time.monotonic()
    conns = await _connect_all(url, cars, cfg, stats, on_open)
    gc.collect()
    gc.freeze()
    pipe.send({"connected": len(conns), "failed": dict(stats.failed), "connect_s": time.monotonic() - started})
    go = await loop.run_in_executor(None, _recv, pipe, cfg["connect_deadline_s"] + 600)
    if go.get("stop"):
        return
    t0, t_end = go["t0"], go["t_end"]
    count_from = t0 + cfg.get("warm_s", 0.0)
    gc.disable()
    stats.measuring = True
    cpu0 = time.process_time()
    if mode == "hold":
        await _hold(conns, cfg, t0, t_end, stats, pending)
    else:
        await _rate(conns, cfg, t0, t_end, stats, pending, windows)
    cpu_s = time.process_time() - cpu0
    await _drain(pending, time.monotonic() + cfg["drain_s"])
    stats.measuring = False
    gc.enable()
    pipe.send({"connected": len(conns), "sent": stats.sent, "acked": stats.acked, "late": stats.late,
               "unanswered": len(pending), "in_window": stats.in_window, "unknown_acks": stats.unknown_acks,
               "send_failed": stats.send_failed, "closes": dict(stats.closes), "errors": dict(stats.errors),
               "other": dict(stats.other), "rtts": stats.rtts, "lag_p99": _pct(stats.lag, 0.99),
               "cpu_s": cpu_s})
    for ws in conns.values():  # no closing handshakes: the server process is ended next
        ws.transport.abort()
    for task in readers:
        task.cancel()


def _client_main(mode: str, url: str, cars: list, cfg: dict, pipe) -> None:
    gc.freeze()
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(_client(mode, url, cars, cfg, pipe))
    except Exception as exc:  # reported to the bench process, which reports it
        try:
            pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        raise


def _run_clients(mode: str, url: str, cars: list, cfg: dict, *, processes: int, duration: float, server_pid: int,
                 on_connected=None, on_go=None) -> dict:
    """Spawn the load client over ``processes`` processes, connect, run ``duration`` seconds, gather."""
    ctx = mp.get_context("spawn")
    workers = []
    for k in range(processes):
        share = cars[k::processes]
        if not share:
            continue
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_client_main, args=(mode, url, share, cfg, there), daemon=True)
        proc.start()
        workers.append((proc, here))
    out: dict = {}
    told = False
    try:
        reports = [_recv(pipe, cfg["connect_deadline_s"] + 120) for _, pipe in workers]
        for report in reports:
            if "error" in report:
                raise RuntimeError(f"load client failed: {report['error']}")
        out["connected"] = sum(r["connected"] for r in reports)
        out["failed"] = sum((collections.Counter(r["failed"]) for r in reports), collections.Counter())
        out["connect_s"] = max(r["connect_s"] for r in reports)
        _log(f"{mode}: {out['connected']} connected in {out['connect_s']:.1f} s; measuring for {duration:g} s")
        if on_connected is not None:
            out.update(on_connected(out) or {})
        t0 = time.monotonic() + 1.0
        t_end = t0 + duration
        _log(f"{mode}: window from monotonic {t0:.2f} to {t_end:.2f}")
        for _, pipe in workers:
            pipe.send({"t0": t0, "t_end": t_end})
        told = True
        if on_go is not None:
            on_go(t0, t_end)
        time.sleep(max(0.0, t0 + cfg.get("warm_s", 0.0) - time.monotonic()))
        cpu_a, wall_a = _cpu_s(server_pid), time.monotonic()
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu_b, wall_b = _cpu_s(server_pid), time.monotonic()
        out["server_rss_end"] = _rss_bytes(server_pid)
        if cpu_a is not None and cpu_b is not None:
            out["server_cpu_pct"] = round(100 * (cpu_b - cpu_a) / (wall_b - wall_a), 1)
        results = [_recv(pipe, cfg["drain_s"] + 120) for _, pipe in workers]
        for result in results:
            if "error" in result:
                raise RuntimeError(f"load client failed: {result['error']}")
    finally:
        for proc, pipe in workers:
            if not told:  # a failure before the window: the clients stop instead of waiting for the word
                try:
                    pipe.send({"stop": True})
                except OSError:
                    pass
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    rtts = [x for r in results for x in r["rtts"]]
    out.update({
        "sent": sum(r["sent"] for r in results), "acked": sum(r["acked"] for r in results),
        "late": sum(r["late"] for r in results), "unanswered": sum(r["unanswered"] for r in results),
        "in_window": sum(r["in_window"] for r in results), "unknown_acks": sum(r["unknown_acks"] for r in results),
        "send_failed": sum(r["send_failed"] for r in results),
        "closes": dict(sum((collections.Counter(r["closes"]) for r in results), collections.Counter())),
        "errors": dict(sum((collections.Counter(r["errors"]) for r in results), collections.Counter())),
        "other": dict(sum((collections.Counter(r["other"]) for r in results), collections.Counter())),
        "p50": _pct(rtts, 0.50), "p99": _pct(rtts, 0.99), "max": max(rtts) if rtts else None,
        "lag_p99": max((r["lag_p99"] or 0.0) for r in results),
        "client_cpu_pct": round(100 * sum(r["cpu_s"] for r in results) / duration, 1),
    })
    out["lost"] = out["unanswered"] + out["late"]
    return out


# --- the bare ceiling server ----------------------------------------------------------------------------

async def _bare_handler(ws):
    from websockets.exceptions import ConnectionClosed

    try:
        await ws.send(WELCOME)
        async for text in ws:
            msg = json.loads(text)
            if msg.get("type") == "telemetry" and msg.get("seq") is not None:
                await ws.send(json.dumps({"v": 1, "type": "ack", "seq": msg["seq"]}, separators=(",", ":")))
    except ConnectionClosed:
        pass


async def _bare_serve(port: int, deflate: bool) -> None:
    from websockets.asyncio.server import serve

    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with serve(_bare_handler, "127.0.0.1", port, backlog=2048, compression="deflate" if deflate else None):
        await stop


# --- diagnostics inside the gateway process (--diag) ----------------------------------------------------
# What stalls the gateway's event loop, measured from inside its process: every garbage collection's pause
# (gc.callbacks), and every stretch of STALL_S or more in which the loop ran no callback, with the main
# thread's stack as a watchdog thread saw it during the stall. Written as JSON at exit.

STALL_S = 0.05


class _Diag:
    def __init__(self, path: str):
        import threading

        self.path, self.t0 = path, time.monotonic()
        self.gc_pauses: list = []  # (t, generation, ms, collected) for pauses of 5 ms or more
        self.gc_totals = collections.Counter()
        self.gc_ms = collections.Counter()
        self.stalls: list = []  # (t, ms, stack seen during the stall)
        self.tick = time.monotonic()
        self.main_ident = threading.get_ident()
        self._gc_started = 0.0
        self._stall_stack = None
        gc.callbacks.append(self._on_gc)
        self.census_n = 0
        signal.signal(signal.SIGUSR1, self._census)
        threading.Thread(target=self._watch, daemon=True, name="bench-diag").start()
        import atexit

        atexit.register(self.write)

    def _census(self, signum, frame):
        """SIGUSR1: the objects the collector tracks, counted and sized (shallow) by type, to PATH-census-N.json."""
        counts, sizes = collections.Counter(), collections.Counter()
        gc.unfreeze()  # frozen objects are not listed: count them too, and freeze them again after
        for obj in gc.get_objects():
            name = f"{type(obj).__module__}.{type(obj).__qualname__}"
            counts[name] += 1
            sizes[name] += sys.getsizeof(obj)
        gc.freeze()
        self.census_n += 1
        with open(f"{self.path}-census-{self.census_n}.json", "w") as f:
            json.dump({"counts": dict(counts.most_common(80)), "bytes": dict(sizes.most_common(80)),
                       "total_objects": sum(counts.values()), "total_bytes": sum(sizes.values())}, f)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000
        gen = info["generation"]
        self.gc_totals[gen] += 1
        self.gc_ms[gen] += ms
        if ms >= 5:
            self.gc_pauses.append((round(time.monotonic() - self.t0, 2), gen, round(ms, 1), info["collected"]))

    async def loop_ticker(self):
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            now = time.monotonic()
            if now - before - 0.01 >= STALL_S:
                self.stalls.append((round(before - self.t0, 2), round((now - before - 0.01) * 1000, 1),
                                    self._stall_stack))
            self._stall_stack = None
            self.tick = now

    def _watch(self):
        import traceback

        written = time.monotonic()
        while True:
            time.sleep(0.02)
            if time.monotonic() - written >= 5:  # the server may be killed rather than exit: write as it goes
                try:
                    self.write(final=False)
                except RuntimeError:  # a counter grew while written: next time
                    pass
                written = time.monotonic()
            if time.monotonic() - self.tick >= STALL_S and self._stall_stack is None:
                frame = sys._current_frames().get(self.main_ident)
                if frame is not None:
                    self._stall_stack = [f"{Path(fs.filename).name}:{fs.lineno} {fs.name}"
                                         for fs in traceback.extract_stack(frame)[-14:]]

    def write(self, final: bool = True):
        if self._on_gc not in gc.callbacks:
            return
        if final:
            gc.callbacks.remove(self._on_gc)
        with open(self.path + ".tmp", "w") as f:
            json.dump({"gc_counts": dict(self.gc_totals), "gc_ms": {k: round(v, 1) for k, v in self.gc_ms.items()},
                       "gc_pauses": self.gc_pauses, "stalls": self.stalls,
                       "t0_monotonic": self.t0, "gc_threshold": gc.get_threshold(),
                       # gc.get_freeze_count() walks every frozen object, holding the GIL for 100 ms and more
                       "freeze_count": gc.get_freeze_count() if final else None}, f)
        os.replace(self.path + ".tmp", self.path)


_diag: _Diag | None = None
_diag_ticker = None


async def diag_app(scope, receive, send):
    """marketplace.asgi's application, with the diagnostics' loop ticker started on the first call."""
    global _diag_ticker
    from marketplace.asgi import application

    if _diag_ticker is None and _diag is not None:
        _diag_ticker = asyncio.get_running_loop().create_task(_diag.loop_ticker())
    return await application(scope, receive, send)


def _serve_diag(path: str, uvicorn_args: list[str]) -> None:
    global _diag
    import uvicorn.main

    _diag = _Diag(path)
    sys.modules.setdefault("tests.bench.gateway", sys.modules["__main__"])  # uvicorn imports diag_app by name
    sys.argv = ["uvicorn", *uvicorn_args]
    try:
        uvicorn.main.main()
    except SystemExit:
        pass
    _diag.write()


# --- database, servers ----------------------------------------------------------------------------------

def _database_create() -> tuple[str, callable, str]:
    """A throwaway database: (DATABASE_URL, drop(), kind)."""
    base = os.environ.get("DATABASE_URL") or DEFAULT_PG
    name = f"bench_gateway_{os.getpid()}"
    if base.startswith(("postgres://", "postgresql://", "pgsql://")):
        try:
            import psycopg

            server, _, _ = base.replace("pgsql://", "postgresql://").rpartition("/")
            with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                conn.execute(f'CREATE DATABASE "{name}"')

            def drop():
                with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

            return f"{server}/{name}", drop, "postgresql"
        except Exception as exc:  # noqa: BLE001 -- any failure to reach PostgreSQL falls back to SQLite
            _log(f"PostgreSQL unreachable ({type(exc).__name__}: {exc}); using a temporary SQLite file")
    tmp = tempfile.mkdtemp(prefix="bench_gateway_")
    return f"sqlite:///{tmp}/bench.sqlite3", lambda: shutil.rmtree(tmp, ignore_errors=True), "sqlite"


def _provision(db_url: str, count: int) -> list[str]:
    """Migrate, then an owner and ``count`` cars with their policies; returns each car's device token."""
    env = {**os.environ, "DATABASE_URL": db_url}
    env.pop("REDIS_URL", None)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=600)
    os.environ["DATABASE_URL"] = db_url
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.db import connections, transaction
    from django.utils import timezone

    from fleet import tokens
    from fleet.models import HardwareGeneration, OwnerPolicy, Vehicle
    from marketplace.models import User

    now, issued, seen = timezone.now(), [], set()
    while len(issued) < count:
        token, prefix = tokens.new_token("dev")
        if prefix not in seen:  # the prefix finds the row: keep them unique
            seen.add(prefix)
            issued.append((token, prefix))
    with transaction.atomic():
        owner = User.objects.create_user(email="bench-owner@bench.local", password=None, role=User.Role.OWNER)
        hardware = HardwareGeneration.objects.get(code="HW4")
        vehicles = Vehicle.objects.bulk_create(
            [Vehicle(owner=owner, name=f"Bench car {i:05d}", hardware=hardware, token_prefix=prefix,
                     token_hash=tokens.digest(token), token_issued_at=now) for i, (token, prefix) in enumerate(issued)],
            batch_size=2000)
        OwnerPolicy.objects.bulk_create([OwnerPolicy(vehicle=v) for v in vehicles], batch_size=2000)
    connections.close_all()
    return [token for token, _ in issued]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def _healthz(port: int, timeout: float = 10) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _redis_clean() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_BENCH_URL, socket_timeout=5)
    keys = list(client.scan_iter("asgi*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i:i + 1000])
    client.close()


class Gateway:
    """One uvicorn process serving marketplace.asgi, as in production but for the bench's database."""

    def __init__(self, env: dict, log_dir: str, name: str, use_redis: bool, deflate: bool, diag: str | None = None):
        if use_redis:
            _redis_clean()
        self.port = free_port()
        self.log = open(Path(log_dir) / f"{name}.log", "wb")
        # With a diagnostics file, the same uvicorn runs under _serve_diag's hooks (GC pauses, event-loop stalls).
        launcher = (["-m", "tests.bench.gateway", "--serve-diag", diag, "--"] if diag else ["-m", "uvicorn"])
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "tests.bench.gateway:diag_app" if diag else "marketplace.asgi:application",
             "--host", "127.0.0.1",
             "--port", str(self.port), "--ws", "websockets-sansio", "--log-level", "warning", "--lifespan", "off",
             "--ws-max-size", str(2 * 64 * 1024), "--ws-per-message-deflate", "true" if deflate else "false"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"ws://127.0.0.1:{self.port}/ws/vehicle/"
        _wait_port(self.port, self.proc, 120)
        if _healthz(self.port, 30) is None:
            raise RuntimeError(f"gateway /healthz does not answer (log: {self.log.name})")
        _log(f"{name}: pid {self.proc.pid} on port {self.port}")

    def stop(self) -> None:
        _stop(self.proc)
        self.log.close()


async def _warm_up(url: str, tokens: list[str]) -> int:
    """A few cars through the whole path (handshake, hello, telemetry, ack, close): loads what is lazy."""
    from websockets.asyncio.client import connect

    ok = 0
    for i, token in enumerate(tokens):
        if i >= 3 and not ok:
            break  # the gateway is not answering: no point waiting for every car
        try:
            async with asyncio.timeout(15):
                async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                                   ping_interval=None) as ws:
                    await ws.send(HELLO)
                    while json.loads(await ws.recv()).get("type") != "welcome":
                        pass
                    await ws.send(TELEMETRY % 1)
                    while json.loads(await ws.recv()).get("type") != "ack":
                        pass
                    ok += 1
        except Exception as exc:  # noqa: BLE001 -- counted: the caller fails when none got through
            _log(f"warm-up car {i}: {type(exc).__name__}: {exc}")
    return ok


def _cpu_us_per_msg(out: dict, window: float) -> float | None:
    """The server's CPU time per acknowledged telemetry message in the measured window, in microseconds."""
    if out.get("server_cpu_pct") is None or not out["in_window"]:
        return None
    return round(out["server_cpu_pct"] / 100 * window / out["in_window"] * 1e6, 1)


def _py_spy_start(args, pid: int, start_at: float, end_at: float) -> subprocess.Popen:
    """py-spy samples the gateway from ``start_at`` to ``end_at`` (monotonic): the threads holding the GIL
    (CPU) in the rate phase; every active thread, idle ones left out, in the hold phase."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    only_gil = ["--gil"] if args.py_spy_phase == "rate" else []
    return subprocess.Popen(
        [args.py_spy, "record", "--pid", str(pid), "--rate", "100", "--duration",
         str(max(1, int(end_at - time.monotonic()))), "--output", args.py_spy_out,
         "--format", "speedscope" if args.py_spy_out.endswith(".json") else "raw",  # speedscope keeps the timeline
         "--threads", *only_gil, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _py_spy_wait(spy: subprocess.Popen | None) -> None:
    if spy is not None:
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)


# --- the bench ------------------------------------------------------------------------------------------

def _source_digest() -> str:
    h = hashlib.sha256()
    for path in [*sorted((ROOT / "fleet/gateway").glob("*.py")), ROOT / "fleet/services.py", ROOT / "fleet/protocol.py"]:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def main(args) -> dict:
    # Sockets: the gateway holds one per car; each client process one per car of its share.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass
    base_cfg = {"open_timeout": 60.0, "connect_concurrency": args.connect_batch, "connect_deadline_s": args.connect_deadline_s,
                "drain_s": ACK_TIMEOUT_S}
    result: dict = {"bench": "gateway"}
    db_url, drop, db_kind = _database_create()
    tmp = tempfile.mkdtemp(prefix="bench_gateway_logs_")
    layer = "channels-redis (db 14)" if args.redis else "in-memory channel layer"
    result["profile"] = (f"{db_kind}, {layer}, one uvicorn process (websockets-sansio, "
                         f"{'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio'}), "
                         f"permessage-deflate {'on' if args.deflate else 'off'}, DJANGO_DEBUG=false, "
                         f"{args.clients} client processes")
    try:
        started = time.monotonic()
        needed = max(args.cars, args.rate_conns) + WARM_CARS
        tokens = _provision(db_url, needed)
        _log(f"database {db_kind} ready with {needed} cars in {time.monotonic() - started:.1f} s")
        env = {**os.environ, "DATABASE_URL": db_url, "DJANGO_DEBUG": "false",
               "DJANGO_SECRET_KEY": "bench-gateway-not-secret-" + "x" * 32, "LOG_LEVEL": "WARNING",
               "PYTHONUNBUFFERED": "1",
               # The bench's cars say hello and then wait, silent, until the whole fleet is connected (and send
               # no heartbeats): the idle timeout real cars never meet would close them.
               "GATEWAY_IDLE_TIMEOUT_S": "3600"}
        env.pop("REDIS_URL", None)
        if args.redis:
            env["REDIS_URL"] = REDIS_BENCH_URL
        warm_tokens, car_tokens = tokens[-WARM_CARS:], tokens[:-WARM_CARS]
        rate_cfg = {**base_cfg, "conn_rate": CONN_RATE, "conn_burst": CONN_BURST, "warm_s": min(2.0, args.rate_s / 5)}
        rate_cars = list(enumerate(car_tokens[:args.rate_conns]))

        # 1. Ceiling: the bare websockets server.
        if not args.skip_bare:
            port = free_port()
            log = open(Path(tmp) / "bare.log", "wb")
            bare = subprocess.Popen([sys.executable, "-m", "tests.bench.gateway", "--serve-bare", str(port),
                                     *(["--deflate"] if args.deflate else [])],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait_port(port, bare, 30)
                _log(f"bare server: pid {bare.pid}; rate phase, {args.rate_conns} connections, {args.rate_s} s")
                out = _run_clients("rate", f"ws://127.0.0.1:{port}/ws/vehicle/", rate_cars, rate_cfg,
                                   processes=args.clients, duration=args.rate_s, server_pid=bare.pid)
            finally:
                _stop(bare)
                log.close()
            window = args.rate_s - rate_cfg["warm_s"]
            result.update({"bare_msgs_per_s": round(out["in_window"] / window, 1), "bare_cpu_pct": out.get("server_cpu_pct"),
                           "bare_cpu_us_per_msg": _cpu_us_per_msg(out, window),
                           "bare_p50_ms": _ms(out["p50"]), "bare_p99_ms": _ms(out["p99"]), "bare_client_cpu_pct": out["client_cpu_pct"],
                           "bare_lost": out["lost"],
                           # at the offered load (connections x CONN_RATE), the ceiling was not reached
                           "bare_capped_by_offer": out["in_window"] / window >= 0.95 * out["connected"] * CONN_RATE})
            _log(f"bare: {result['bare_msgs_per_s']} msgs/s")

        # 2. Connections held by one gateway process.
        if not args.skip_hold:
            gateway = Gateway(env, tmp, "gateway-hold", args.redis, args.deflate,
                              diag=args.diag and f"{args.diag}-hold.json")
            try:
                warmed = asyncio.run(_warm_up(gateway.url, warm_tokens))
                if not warmed:
                    raise RuntimeError(f"no warm-up car got through the gateway (log: {gateway.log.name})")
                time.sleep(2)
                rss_base = _rss_bytes(gateway.proc.pid)
                if args.diag:  # a census of the gateway's objects now, and again when every car is connected
                    os.kill(gateway.proc.pid, signal.SIGUSR1)
                hold_cfg = {**base_cfg, "n_total": args.cars, "period_s": PERIOD_S}

                def connected(out):
                    # Let the gateway write the hellos (connected=True) before the clock starts.
                    settle_from, db_connected = time.monotonic(), None
                    while time.monotonic() - settle_from < 60:
                        health = _healthz(gateway.port)
                        db_connected = health and health.get("vehicles_connected")
                        if db_connected is not None and db_connected >= out["connected"]:
                            break
                        time.sleep(1)
                    _log(f"hold: {out['connected']} connected in {out['connect_s']:.1f} s "
                         f"(failed {dict(out['failed'])}), settled in {time.monotonic() - settle_from:.1f} s")
                    if args.diag:
                        os.kill(gateway.proc.pid, signal.SIGUSR1)
                    return {"rss_connected": _rss_bytes(gateway.proc.pid), "db_connected": db_connected,
                            "settle_s": time.monotonic() - settle_from}

                def go(t0, t_end):
                    nonlocal spy
                    if args.py_spy and args.py_spy_phase == "hold":
                        spy = _py_spy_start(args, gateway.proc.pid, t0, t_end)

                spy = None
                _log(f"hold phase: {args.cars} cars, batches of {args.connect_batch} per client process")
                out = _run_clients("hold", gateway.url, list(enumerate(car_tokens[:args.cars])), hold_cfg,
                                   processes=args.clients, duration=args.hold_s, server_pid=gateway.proc.pid,
                                   on_connected=connected, on_go=go)
                alive = gateway.proc.poll() is None
            finally:
                _py_spy_wait(spy)
                gateway.stop()
            held = out["connected"] - sum(out["closes"].values()) if alive else 0
            rss_delta = (out["rss_connected"] or 0) - (rss_base or 0)
            result.update({
                "cars": args.cars, "cars_held": held, "failed_connects": sum(out["failed"].values()),
                "connect_failures": dict(out["failed"]), "connect_s": round(out["connect_s"], 2),
                "connects_per_s": round(out["connected"] / out["connect_s"], 1) if out["connect_s"] else None,
                "settle_s": round(out["settle_s"], 1), "db_connected": out["db_connected"],
                "telemetry_sent": out["sent"], "acked": out["acked"] - out["late"], "lost": out["lost"], "late": out["late"],
                "closed": out["closes"], "gateway_errors": out["errors"], "gateway_other": out["other"],
                "send_failed": out["send_failed"],
                "p50_ms": _ms(out["p50"]), "p99_ms": _ms(out["p99"]), "max_ms": _ms(out["max"]),
                "client_lag_p99_ms": _ms(out["lag_p99"]), "hold_cpu_pct": out.get("server_cpu_pct"),
                "rss_base_mb": round((rss_base or 0) / 2**20, 1), "rss_mb": round((out["rss_connected"] or 0) / 2**20, 1),
                "rss_hold_end_mb": round((out.get("server_rss_end") or 0) / 2**20, 1),
                "bytes_per_car": round(rss_delta / out["connected"]) if out["connected"] else None,
                "hold_s": args.hold_s, "period_s": PERIOD_S, "gateway_alive": alive,
            })
            _log(f"hold: held {held}, p99 {result['p99_ms']} ms, lost {out['lost']}, {result['bytes_per_car']} B/car")

        # 3. Message rate through one gateway process.
        if not args.skip_rate:
            gateway = Gateway(env, tmp, "gateway-rate", args.redis, args.deflate,
                              diag=args.diag and f"{args.diag}-rate.json")
            spy = None
            try:
                asyncio.run(_warm_up(gateway.url, warm_tokens))

                def go(t0, t_end):
                    nonlocal spy
                    if args.py_spy and args.py_spy_phase == "rate":
                        spy = _py_spy_start(args, gateway.proc.pid, t0 + rate_cfg["warm_s"], t_end)

                _log(f"gateway rate phase: {args.rate_conns} connections, {args.rate_s} s")
                out = _run_clients("rate", gateway.url, rate_cars, rate_cfg, processes=args.clients,
                                   duration=args.rate_s, server_pid=gateway.proc.pid, on_go=go)
            finally:
                _py_spy_wait(spy)
                gateway.stop()
            window = args.rate_s - rate_cfg["warm_s"]
            result.update({
                "msgs_per_s": round(out["in_window"] / window, 1), "rate_cpu_pct": out.get("server_cpu_pct"),
                "cpu_us_per_msg": _cpu_us_per_msg(out, window),
                "rate_p50_ms": _ms(out["p50"]), "rate_p99_ms": _ms(out["p99"]), "rate_lost": out["lost"],
                "rate_errors": out["errors"], "rate_closed": out["closes"], "rate_client_cpu_pct": out["client_cpu_pct"],
                "rate_conns": args.rate_conns, "rate_connected": out["connected"], "rate_s": args.rate_s,
                "offered_cap_per_s": round(out["connected"] * CONN_RATE),
                "rate_capped_by_offer": out["in_window"] / window >= 0.95 * out["connected"] * CONN_RATE,
            })
            if result.get("bare_msgs_per_s"):
                result["ratio_vs_bare"] = round(result["msgs_per_s"] / result["bare_msgs_per_s"], 4)
            if result.get("bare_cpu_us_per_msg") and result.get("cpu_us_per_msg"):
                # The same comparison by the server's own CPU time per message: on a shared machine, where the
                # load clients and other work take turns with the server, this one moves less from run to run.
                result["cpu_ratio_vs_bare"] = round(result["bare_cpu_us_per_msg"] / result["cpu_us_per_msg"], 4)
            _log(f"gateway: {result['msgs_per_s']} msgs/s")
        result["gateway_digest"] = _source_digest()
        # Keep the servers' logs only when a gateway wrote something (errors): say where they are.
        if any(p.stat().st_size for p in Path(tmp).glob("gateway-*.log")):
            result["logs"] = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # noqa: BLE001 -- Django may not be set up
            pass
        drop()
        if args.redis:
            _redis_clean()
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1000 cars, short windows")
    parser.add_argument("--cars", type=int, default=None, help="cars held in the connections phase (10000)")
    parser.add_argument("--hold-s", type=float, default=None, help="telemetry window of the connections phase (35)")
    parser.add_argument("--rate-conns", type=int, default=None, help="connections of the message-rate phase (800)")
    parser.add_argument("--rate-s", type=float, default=None, help="window of the message-rate phase (10)")
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument("--connect-batch", type=int, default=100, help="handshakes in flight per client process")
    parser.add_argument("--connect-deadline-s", type=float, default=600)
    parser.add_argument("--redis", action="store_true", help=f"channels-redis layer on {REDIS_BENCH_URL}")
    parser.add_argument("--deflate", action="store_true", help="servers accept the permessage-deflate the client offers "
                        "(the agent offers it; docs/deploy.md runs the gateway with it off)")
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument("--skip-hold", action="store_true")
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument("--py-spy", default=None, help="path of a py-spy binary: sample the gateway's rate phase "
                                                        "(threads holding the GIL, i.e. CPU, per thread)")
    parser.add_argument("--py-spy-out", default=None, help="where py-spy writes its raw (collapsed) stacks")
    parser.add_argument("--py-spy-phase", choices=["rate", "hold"], default="rate", help="the phase py-spy samples")
    parser.add_argument("--diag", default=None, help="path prefix: each gateway process writes its GC pauses and "
                        "event-loop stalls (with the stack seen during each) to PREFIX-hold.json / PREFIX-rate.json")
    parser.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-diag"]:  # python -m tests.bench.gateway --serve-diag OUT -- <uvicorn's arguments>
        _serve_diag(sys.argv[2], sys.argv[4:])
        sys.exit(0)
    args = _parser().parse_args()
    if args.serve_bare is not None:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(_bare_serve(args.serve_bare, args.deflate))
        sys.exit(0)
    quick = args.quick
    args.cars = args.cars if args.cars is not None else (1000 if quick else 10000)
    args.hold_s = args.hold_s if args.hold_s is not None else (15.0 if quick else 35.0)
    args.rate_conns = args.rate_conns if args.rate_conns is not None else (300 if quick else 800)
    args.rate_s = args.rate_s if args.rate_s is not None else (5.0 if quick else 10.0)
    if args.py_spy and not args.py_spy_out:
        args.py_spy_out = tempfile.mkstemp(prefix="gateway-pyspy-", suffix=".txt")[1]
    try:
        figures = main(args)
    except Exception as exc:  # noqa: BLE001 -- reported as the bench's figure, and a failing exit
        print(json.dumps({"bench": "gateway", "error": f"{type(exc).__name__}: {exc}"}))
        raise
    if args.py_spy:
        figures["py_spy_out"] = args.py_spy_out
    print(json.dumps(figures))
    if not figures.get("cars_held") and not args.skip_hold:
        sys.exit(1)
