"""Benchmark: the whole loop with real processes. A fresh database, the product's processes, the fleet
simulator with N cars, one job of D documents through the REST API; measures documents (embeddings) and
units per second from submission to completion, and the dispatch overhead against embedding the same
documents directly in one process. Ends with one JSON line.

Profiles: ``services`` (the default: a throwaway PostgreSQL database, Redis, two uvicorn gateway workers, a
Celery worker and beat, the simulator in two processes; the deployment this size is for) and ``embedded``
(SQLite and `run_embedded`; the demo profile, meant for a few dozen cars).

Run alone: python -m tests.bench.e2e [--cars 1000] [--docs 8000] [--profile services|embedded]"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone

from tests.bench.support import ROOT, free_port, throwaway_postgres

REDIS_BENCH_URL = "redis://127.0.0.1:6379/13"


def _get(url, key):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _post_job(base, key, body: bytes) -> dict:
    boundary = "benchboundary"
    deadline = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in {"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": "2000000",
                          "deadline": deadline}.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"inputs\"; filename=\"d.jsonl\"\r\n"
                 f"Content-Type: application/x-ndjson\r\n\r\n".encode() + body + f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(f"{base}/api/v1/jobs/", data=b"".join(parts), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _direct_docs_per_s(texts: list[str]) -> float:
    from fleet.agent.models import get_runner

    runner = get_runner("all-minilm-l6-v2", "int8")
    runner.embed(texts[:8])
    started = time.perf_counter()
    for i in range(0, len(texts), 8):
        runner.embed(texts[i:i + 8])
    return len(texts) / (time.perf_counter() - started)


@contextlib.contextmanager
def _database(profile: str, tmp: str):
    if profile == "embedded":
        yield f"sqlite:///{tmp}/bench.sqlite3"
    else:
        with throwaway_postgres("bench_e2e") as url:
            yield url


def _product(profile: str, env: dict, port: int, cars: int, tmp: str, logs) -> list[subprocess.Popen]:
    """Start the product and a simulated fleet of ``cars`` cars on ``profile``; return the processes."""
    start = lambda *args: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=logs,  # noqa: E731
                                           stderr=subprocess.STDOUT)
    sim_processes = str(2 if cars > 100 else 1)
    if profile == "embedded":
        return [start("manage.py", "run_embedded", "--no-seed", "--cars", str(cars), "--sim-processes", sim_processes,
                      "--port", str(port))]
    base = f"http://127.0.0.1:{port}"
    return [start("-m", "uvicorn", "marketplace.asgi:application", "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "2", "--ws", "websockets-sansio", "--ws-per-message-deflate", "false",
                  "--ws-max-size", "131072", "--log-level", "warning"),
            start("-m", "celery", "-A", "marketplace", "worker", "--concurrency", "2", "--loglevel", "warning",
                  "--without-gossip", "--without-mingle"),
            start("-m", "celery", "-A", "marketplace", "beat", "--loglevel", "warning", "--schedule",
                  f"{tmp}/celerybeat-schedule"),
            start("manage.py", "simulate_fleet", "--cars", str(cars), "--processes", sim_processes, "--server", base)]


def main(cars: int, docs: int, profile: str = "services", timeout: float = 600) -> dict:
    with tempfile.TemporaryDirectory() as tmp, _database(profile, tmp) as database_url:
        env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1",
               "DJANGO_DEBUG": "false", "DJANGO_SECURE_SSL_REDIRECT": "false",
               "DJANGO_SECRET_KEY": "bench-e2e-not-a-secret-" + "x" * 32}
        if profile == "services":
            import redis

            redis.Redis.from_url(REDIS_BENCH_URL).flushdb()
            env["REDIS_URL"] = REDIS_BENCH_URL
        else:
            env.pop("REDIS_URL", None)
        run = lambda *args, **kw: subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,  # noqa: E731
                                                  check=True, capture_output=True, text=True, **kw)
        run("migrate", "-v0")
        key = run("issue_api_key", "bench@example.com").stdout.strip().splitlines()[-1]
        run("billing_grant", "bench@example.com", "100000.00", "--note", "bench")  # buyers pay in advance
        sys.path.insert(0, str(ROOT))
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
        import django

        django.setup()
        from marketplace.corpus import documents

        rows = documents(docs)
        body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        (ROOT / "test-output").mkdir(exist_ok=True)
        logs = open(ROOT / "test-output" / "bench-e2e-product.log", "wb")  # kept for a look after a failure
        procs = _product(profile, env, port, cars, tmp, logs)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if _get(f"{base}/healthz", key)["vehicles_connected"] >= cars:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise TimeoutError("the fleet did not connect; see test-output/bench-e2e-product.log")
                time.sleep(0.5)
            connected_after = time.monotonic() - deadline + 600
            time.sleep(2)  # a first auction round with every car offering
            started = time.monotonic()
            job = _post_job(base, key, body)
            while (state := _get(f"{base}/api/v1/jobs/{job['id']}/", key))["state"] != "completed":
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"job not done: {state}")
                time.sleep(0.25)
            elapsed = time.monotonic() - started
            connected_at_end = _get(f"{base}/healthz", key)["vehicles_connected"]
        finally:
            for proc in reversed(procs):  # the fleet first, so that its cars release their leases to a live server
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    direct = _direct_docs_per_s([r["text"] for r in rows])
    fleet_rate = docs / elapsed
    return {"bench": "e2e", "profile": profile, "cars": cars, "docs": docs, "units": state["units_total"],
            "connect_s": round(connected_after, 1), "cars_connected_at_end": connected_at_end,
            "seconds": round(elapsed, 2), "embeddings_per_s": round(fleet_rate, 1),
            "units_per_s": round(state["units_total"] / elapsed, 2), "direct_embeddings_per_s": round(direct, 1),
            "dispatch_overhead": round(1 - fleet_rate / direct, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cars", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--profile", choices=["services", "embedded"], default="services")
    args = parser.parse_args()
    print(json.dumps(main(args.cars, args.docs, args.profile)))
