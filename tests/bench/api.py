"""Benchmark: job submission through the REST API. A fresh SQLite database and the product server on loopback
(embedded profile, no cars, the auction running); clients post jobs of 10,000 JSON Lines documents as
multipart uploads, each with an Idempotency-Key, a bounded number of them within a bounded time. Measures
jobs per second and the latency of each submission (p50, p99), after one warm-up job. Ends with one JSON line.

Run alone: python -m tests.bench.api [--jobs 24] [--concurrency 2] [--lines 10000] [--max-seconds 240]"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx

from tests.bench.support import ROOT, free_port


def _documents(lines: int) -> bytes:
    sys.path.insert(0, str(ROOT))
    from marketplace.corpus import documents  # no Django needed: standard-library docstrings

    return b"".join(json.dumps(row).encode() + b"\n" for row in documents(lines))


def _submit(client: httpx.Client, body: bytes, lines: int) -> float:
    """Post one job; returns its latency in seconds."""
    deadline = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    started = time.perf_counter()
    response = client.post("/api/v1/jobs/", headers={"Idempotency-Key": str(uuid.uuid4())},
                           data={"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": "2000000",
                                 "deadline": deadline},
                           files={"inputs": ("docs.jsonl", body, "application/x-ndjson")})
    elapsed = time.perf_counter() - started
    if response.status_code != 201 or response.json()["docs_total"] != lines:
        raise RuntimeError(f"submission failed: {response.status_code} {response.text[:500]}")
    return elapsed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main(jobs: int, concurrency: int, lines: int, max_seconds: float) -> dict:
    body = _documents(lines)
    with tempfile.TemporaryDirectory() as tmp:
        # Production settings (no DEBUG), which want every secret: the local Stripe peer's will do.
        env = {"STRIPE_SECRET_KEY": "sk_test_local_peer", "STRIPE_WEBHOOK_SECRET": "whsec_local_peer", **os.environ,
               "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3", "PYTHONUNBUFFERED": "1", "DJANGO_DEBUG": "false",
               "DJANGO_SECURE_SSL_REDIRECT": "false",
               "DJANGO_SECRET_KEY": "bench-api-not-a-secret-" + "x" * 32, "API_THROTTLE_RATE": "1000000/min"}
        env.pop("REDIS_URL", None)
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "-v0"], cwd=ROOT, env=env, check=True, capture_output=True)
        key = subprocess.run([*manage, "issue_api_key", "bench-api@example.com"], cwd=ROOT, env=env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        # buyers pay in advance: enough credit for every job the bench creates
        subprocess.run([*manage, "billing_grant", "bench-api@example.com", "100000.00", "--note", "bench"], cwd=ROOT,
                       env=env, check=True, capture_output=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        (ROOT / "test-output").mkdir(exist_ok=True)
        log = open(ROOT / "test-output" / "bench-api-server.log", "wb")  # kept for a look after a failure
        server = subprocess.Popen([*manage, "run_embedded", "--no-seed", "--cars", "0", "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start: see test-output/bench-api-server.log")
                time.sleep(0.3)
            headers = {"Authorization": f"Bearer {key}"}
            clients = [httpx.Client(base_url=base, headers=headers, timeout=120) for _ in range(concurrency)]
            _submit(clients[0], body, lines)  # warm-up: the tokenizer loads on the first job
            stop_at = time.monotonic() + max_seconds
            latencies: list[float] = []

            tickets = iter(range(jobs))  # next() on it is atomic: exactly ``jobs`` submissions in all

            def worker(client: httpx.Client) -> None:
                while next(tickets, None) is not None and time.monotonic() < stop_at:
                    latencies.append(_submit(client, body, lines))

            started = time.monotonic()
            with ThreadPoolExecutor(concurrency) as pool:
                for future in [pool.submit(worker, client) for client in clients]:
                    future.result()
            elapsed = time.monotonic() - started
            for client in clients:
                client.close()
        finally:
            server.terminate()
            server.wait(30)
    return {"bench": "api", "jobs": len(latencies), "lines_per_job": lines, "upload_bytes": len(body),
            "concurrency": concurrency, "seconds": round(elapsed, 2),
            "jobs_per_s": round(len(latencies) / elapsed, 3), "docs_per_s": round(len(latencies) * lines / elapsed, 1),
            "p50_ms": round(1000 * _percentile(latencies, 0.50), 1),
            "p99_ms": round(1000 * _percentile(latencies, 0.99), 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--max-seconds", type=float, default=240)
    args = parser.parse_args()
    print(json.dumps(main(args.jobs, args.concurrency, args.lines, args.max_seconds)))
