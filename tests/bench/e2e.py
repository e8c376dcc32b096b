"""Benchmark: the whole loop on the embedded profile with real processes. A fresh SQLite database, the
product server, the fleet simulator with N cars, one job of D documents through the REST API; measures
documents (embeddings) and units per second from submission to completion, and the dispatch overhead
against embedding the same documents directly in one process. Ends with one JSON line.

Run alone: python -m tests.bench.e2e [--cars 1000] [--docs 8000]"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def main(cars: int, docs: int, timeout: float = 600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3", "PYTHONUNBUFFERED": "1",
               "DJANGO_DEBUG": "false", "DJANGO_SECRET_KEY": "bench-e2e-not-a-secret-" + "x" * 32}
        env.pop("REDIS_URL", None)
        run = lambda *args, **kw: subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,  # noqa: E731
                                                  check=True, capture_output=True, text=True, **kw)
        run("migrate", "-v0")
        key = run("issue_api_key", "bench@example.com").stdout.strip().splitlines()[-1]
        sys.path.insert(0, str(ROOT))
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
        import django

        django.setup()
        from marketplace.corpus import documents

        rows = documents(docs)
        body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        (ROOT / "test-output").mkdir(exist_ok=True)
        logs = open(ROOT / "test-output" / "bench-e2e-product.log", "wb")  # kept for a look after a failure
        procs = [subprocess.Popen([sys.executable, "manage.py", "run_embedded", "--no-seed", "--cars", str(cars),
                                   "--sim-processes", str(2 if cars > 100 else 1), "--port", str(port)], cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT)]
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    if _get(f"{base}/healthz", key)["vehicles_connected"] >= cars:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("fleet did not connect")
                time.sleep(0.5)
            time.sleep(2)  # a first auction round with every car offering
            started = time.monotonic()
            job = _post_job(base, key, body)
            while (state := _get(f"{base}/api/v1/jobs/{job['id']}/", key))["state"] != "completed":
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"job not done: {state}")
                time.sleep(0.25)
            elapsed = time.monotonic() - started
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    direct = _direct_docs_per_s([r["text"] for r in rows])
    fleet_rate = docs / elapsed
    return {"bench": "e2e", "cars": cars, "docs": docs, "units": state["units_total"], "seconds": round(elapsed, 2),
            "embeddings_per_s": round(fleet_rate, 1), "units_per_s": round(state["units_total"] / elapsed, 2),
            "direct_embeddings_per_s": round(direct, 1), "dispatch_overhead": round(1 - fleet_rate / direct, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cars", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=8000)
    args = parser.parse_args()
    print(json.dumps(main(args.cars, args.docs)))
