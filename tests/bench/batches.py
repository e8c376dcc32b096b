"""Benchmark: an OpenAI-compatible batch of 10,000 embedding requests through the official ``openai`` client
(issue 12). A fresh SQLite database and the product on the embedded profile (`run_embedded`, its simulated fleet
of ``--cars`` cars), on loopback only. The client uploads the file (``files.create``), makes the batch
(``batches.create``), polls ``batches.retrieve`` until it is ``completed`` and reads the output with
``files.content``; measured: the time from ``batches.create`` to ``completed``. Each request is one short
document (a standard-library docstring cut at ``--chars`` characters, at a word), so that the fleet, which
really computes the embeddings on this machine's CPU, finishes in minutes. If it cannot within
``--max-seconds``, the batch is cancelled then and the figures say how many requests completed in that time
(``completed: false``); the file still holds 10,000 lines. For an anchor, the same documents are then posted
once to our job API (``POST /api/v1/jobs/``, cancelled at once) and that submission timed.

Then, in process with the server stopped, on the same database, the server's overhead per request against the
job API's, each pair interleaved in this run (medians and minimums of ``--repeats``):

- ``parse``: the batch file read into the batch's job inputs (marketplace.batches.parse and the document lines
  marketplace.flows.batch_create feeds to the job) against the job API's reading of the same documents as
  JSON Lines (marketplace.services._lines and _parse_line, as job_prepare does);
- ``prepare``: the same plus marketplace.services.job_prepare (tokenizing, costing, cutting into units), which
  both paths run: the batch's whole create-time work against the job API's;
- ``assembly``: marketplace.flows.batch_finalize writing the batch's output file (reading the units,
  counting tokens for ``usage``, OpenAI's output lines, the file saved) against
  marketplace.selectors.job_results_lines, what ``GET /api/v1/jobs/{id}/results/`` streams, over the same job.

Every loop is bounded in count and time; every process started is stopped by its id; the temporary directory
(database, logs) is removed. Ends with one JSON line.

Run alone: python -m tests.bench.batches [--requests 10000] [--cars 20] [--chars 100] [--max-seconds 400]"""

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from tests.bench.support import ROOT, free_port

MODEL = "all-minilm-l6-v2"
ENDPOINT = "/v1/embeddings"
#: The bid, as tests.bench.e2e's jobs: micro-units per 10^15 operations (sent per million tokens of the model).
BID_MICROS = 2_000_000
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


def _files(requests: int, chars: int) -> tuple[bytes, bytes]:
    """The batch file (one request per line, OpenAI's default float encoding) and the same documents as the
    job API's JSON Lines (the custom_id as the document id)."""
    from marketplace.corpus import documents  # standard-library docstrings: nothing downloaded

    texts = [_short(d["text"], chars) for d in documents(requests)]
    ids = [f"req-{i:05d}" for i in range(requests)]
    batch = b"".join(json.dumps({"custom_id": i, "method": "POST", "url": ENDPOINT,
                                 "body": {"model": MODEL, "input": t}}).encode() + b"\n" for i, t in zip(ids, texts))
    job = b"".join(json.dumps({"id": i, "text": t}).encode() + b"\n" for i, t in zip(ids, texts))
    return batch, job


def _descendants(pid: int) -> list[int]:
    """The ids of a process's live descendants (Linux /proc), to check that stopping the server stopped them."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(server: subprocess.Popen) -> int:
    """Stop the server (it stops its fleet and Stripe peer, which also die with it), then any descendant of
    it still there after 20 s, each by its id. Returns how many had to be killed."""
    children = _descendants(server.pid)
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = 0
    for pid in children:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _wait_fleet(base: str, cars: int, server: subprocess.Popen, timeout: float = 180) -> float:
    started = time.monotonic()
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).json()["vehicles_connected"] >= cars:
                return time.monotonic() - started
        except (httpx.TransportError, ValueError, KeyError):
            pass
        if time.monotonic() - started > timeout or server.poll() is not None:
            raise RuntimeError(f"the fleet of {cars} cars did not connect within {timeout:.0f} s")
        time.sleep(0.5)


def _run_batch(base: str, key: str, batch_body: bytes, job_body: bytes, requests: int, max_seconds: float) -> dict:
    """Drive the live server with the official client; returns the figures and the batch's job id."""
    import openai

    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    catalogue = http.get("/api/v1/models/").raise_for_status().json()
    rows = catalogue["results"] if isinstance(catalogue, dict) else catalogue
    ops_per_token = next(m["ops_per_token"] for m in rows if m["slug"] == MODEL)
    from billing.money import price_per_units_micros

    bid = price_per_units_micros(price_micros=BID_MICROS, ops_per_unit=ops_per_token, per=10**6)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=180)
    try:
        started = time.monotonic()
        file = client.files.create(file=("requests.jsonl", batch_body), purpose="batch")
        upload_s = time.monotonic() - started
        started = time.monotonic()  # the measured span: batches.create to completed
        batch = client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h",
                                      extra_body={"max_price_per_million_tokens_micros": bid})
        create_s = time.monotonic() - started
        if batch.status != "in_progress" or batch.request_counts.total != requests or batch.request_counts.failed:
            raise RuntimeError(f"the batch was not accepted whole: {batch}")
        polls, progress = 0, []
        while batch.status not in TERMINAL and time.monotonic() - started < max_seconds and polls < 20 * max_seconds:
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
            polls += 1
            if polls % 60 == 0:
                progress.append([round(time.monotonic() - started), batch.request_counts.completed])
        elapsed = time.monotonic() - started
        completed_in_time = batch.status == "completed"
        if batch.status not in TERMINAL:  # out of time: stop it; its finished requests are delivered
            batch = client.batches.cancel(batch.id)
            for _ in range(60):
                if batch.status in TERMINAL:
                    break
                time.sleep(0.5)
                batch = client.batches.retrieve(batch.id)
        done = batch.request_counts.completed
        download_s = output_bytes = None
        if batch.output_file_id:
            begun = time.monotonic()
            content = client.files.content(batch.output_file_id).content
            download_s, output_bytes = time.monotonic() - begun, len(content)
            lines = [json.loads(line) for line in content.splitlines()]
            del content
            ids = [line["custom_id"] for line in lines]
            if len(lines) != done or ids != sorted(ids) or any(
                    line["error"] is not None or len(line["response"]["body"]["data"][0]["embedding"]) != 384
                    for line in lines):
                raise RuntimeError("the output file does not hold one 384-float embedding per completed request")
            del lines
        # The anchor over HTTP: the same documents as one submission to our job API, cancelled at once.
        deadline = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        begun = time.monotonic()
        answer = http.post("/api/v1/jobs/", headers={"Idempotency-Key": str(uuid.uuid4())},
                           data={"model": MODEL, "precision": "int8", "max_price_micros": str(BID_MICROS),
                                 "deadline": deadline},
                           files={"inputs": ("docs.jsonl", job_body, "application/x-ndjson")})
        job_create_s = time.monotonic() - begun
        if answer.status_code != 201 or answer.json()["docs_total"] != requests:
            raise RuntimeError(f"the job API refused the documents: {answer.status_code} {answer.text[:300]}")
        http.post(f"/api/v1/jobs/{answer.json()['id']}/cancel/",
                  headers={"Idempotency-Key": str(uuid.uuid4())}).raise_for_status()
    finally:
        client.close()
        http.close()
    return {"status": batch.status, "completed": completed_in_time, "requests_completed": done,
            "seconds": round(elapsed, 1), "requests_per_s": round(done / elapsed, 1), "progress": progress,
            "upload_s": round(upload_s, 2), "create_s": round(create_s, 2), "job_api_create_s": round(job_create_s, 2),
            "download_s": None if download_s is None else round(download_s, 2), "output_bytes": output_bytes,
            "polls": polls, "bid_per_million_tokens_micros": bid, "_batch_id": batch.id}


def _overhead(batch_public_id: str, batch_body: bytes, job_body: bytes, repeats: int, budget_s: float) -> dict:
    """In process, no server: the batch path's parse, prepare and output assembly against the job API's, on the
    same documents and the same job (see the module's docstring). Pairs interleaved; medians, and the minimums
    (on a loaded machine the least disturbed run)."""
    import numpy as np
    from django.conf import settings
    from django.db import connections

    from fleet import workloads
    from fleet.models import WorkUnit
    from marketplace import batches, flows, selectors, services
    from marketplace.models import AIModel, Batch, BatchFile

    models = {m.slug: workloads.ModelInfo.of(m)
              for m in AIModel.objects.filter(active=True)}
    limit = settings.MAX_UPLOAD_LINE_BYTES
    deadline = datetime.now(timezone.utc) + timedelta(hours=1)

    def batch_parse():  # as marketplace.flows.batch_create, up to the job's input lines
        parsed = batches.parse(batch_body.splitlines(), endpoint=ENDPOINT, models=models, max_text_bytes=limit)
        assert not parsed.errors and not parsed.file_errors
        return [json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode() + b"\n"
                for request in parsed.requests for doc_id, text in zip(batches.document_ids(request), request.texts)]

    def job_parse():  # as marketplace.services.job_prepare reads an upload
        return [services._parse_line(raw, n) for n, raw in enumerate(services._lines(io.BytesIO(job_body), limit), 1)]

    def prepare(inputs):
        draft = services.job_prepare(model_slug=MODEL, precision="int8", max_price_micros=BID_MICROS,
                                     deadline=deadline, inputs=inputs)
        draft.units.close()
        return draft.docs_total

    batch = Batch.objects.select_related("job").get(public_id=batch_public_id)
    job = batch.job
    # Output assembly is compared over every request: units the fleet did not finish (a cut-short run) get a
    # synthetic vector here, in this throwaway database.
    dims = models[MODEL].dims
    filler = base64.b64encode(np.random.default_rng(0).standard_normal(dims).astype("<f4").tobytes()).decode()
    filled = 0
    for unit in WorkUnit.objects.filter(job=job).exclude(state=WorkUnit.State.DONE).only("pk", "inputs"):
        unit.result, unit.state = [filler] * len(unit.inputs), WorkUnit.State.DONE
        unit.save(update_fields=["result", "state"])
        filled += 1
    kept = {f: getattr(batch, f) for f in ("finalized_at", "output_file_id", "error_file_id", "request_completed",
                                           "request_failed", "usage_tokens")}

    def batch_assemble():
        Batch.objects.filter(pk=batch.pk).update(finalized_at=None, output_file_id="", error_file_id="")
        assert flows.batch_finalize(batch_id=batch.pk)
        written = Batch.objects.get(pk=batch.pk)
        assert written.request_completed == len(batch.requests), written.request_completed
        size = BatchFile.objects.get(public_id=written.output_file_id).bytes
        BatchFile.objects.filter(public_id__in=[written.output_file_id, written.error_file_id]).delete()
        return size

    def job_assemble():
        return sum(len(line) for line in selectors.job_results_lines(job=job))

    pairs = {"parse": (batch_parse, job_parse),
             "prepare": (lambda: prepare(iter(batch_parse())), lambda: prepare(io.BytesIO(job_body))),
             "assembly": (batch_assemble, job_assemble)}
    requests, documents = batch.request_total, job.docs_total
    figures = {}
    for name, (ours, anchor) in pairs.items():
        ours(), anchor()  # warm-up (imports, the tokenizer, the page cache)
        times: dict[str, list[float]] = {"batch": [], "job_api": []}
        stop_at = time.monotonic() + budget_s
        for _ in range(repeats):
            for side, fn in (("batch", ours), ("job_api", anchor)):
                started = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - started)
            if time.monotonic() > stop_at:
                break
        batch_us = 1e6 * statistics.median(times["batch"]) / requests
        job_us = 1e6 * statistics.median(times["job_api"]) / documents
        batch_min, job_min = 1e6 * min(times["batch"]) / requests, 1e6 * min(times["job_api"]) / documents
        figures[name] = {"batch_us_per_request": round(batch_us, 1), "job_api_us_per_request": round(job_us, 1),
                         "ratio": round(batch_us / job_us, 2), "overhead_us_per_request": round(batch_us - job_us, 1),
                         "min_batch_us": round(batch_min, 1), "min_job_api_us": round(job_min, 1),
                         "min_ratio": round(batch_min / job_min, 2), "repeats": len(times["batch"])}
    figures["assembly"]["batch_output_bytes"] = batch_assemble()
    figures["assembly"]["job_api_results_bytes"] = job_assemble()
    figures["assembly"]["units_given_synthetic_vectors"] = filled
    Batch.objects.filter(pk=batch.pk).update(**kept)
    connections.close_all()
    return figures


def main(requests: int, cars: int, chars: int, max_seconds: float, repeats: int) -> dict:
    wall = time.monotonic()
    load = {"start": _load()}
    batch_body, job_body = _files(requests, chars)
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
        # Production settings (no DEBUG), which want every secret: the local Stripe peer's will do, on a port of
        # its own (another run on this machine may hold the default one). Everything the profile writes: tmp.
        env = {**os.environ, "STRIPE_SECRET_KEY": "sk_test_local_peer", "STRIPE_WEBHOOK_SECRET": "whsec_local_peer",
               "STRIPE_API_BASE": f"http://127.0.0.1:{free_port()}", "DATABASE_URL": f"sqlite:///{tmp}/bench.sqlite3",
               "VAR_DIR": tmp, "PYTHONUNBUFFERED": "1", "DJANGO_DEBUG": "false", "DJANGO_SECURE_SSL_REDIRECT": "false",
               "DJANGO_SECRET_KEY": "bench-batches-not-a-secret-" + "x" * 32, "LOG_LEVEL": "WARNING"}
        env.pop("REDIS_URL", None)
        env.pop("DJANGO_SETTINGS_MODULE", None)
        manage = [sys.executable, "manage.py"]

        def run(*args):
            return subprocess.run([*manage, *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                                  timeout=300)

        run("migrate", "-v0")
        key = run("issue_api_key", "bench-batches@example.com").stdout.strip().splitlines()[-1]
        run("billing_grant", "bench-batches@example.com", "100000.00", "--note", "bench")  # buyers pay in advance
        # This process reads the same database in process, after the server has stopped.
        os.environ.update({k: env[k] for k in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE",
                                               "DATABASE_URL", "VAR_DIR", "DJANGO_DEBUG", "DJANGO_SECRET_KEY",
                                               "LOG_LEVEL")})
        os.environ.pop("REDIS_URL", None)
        os.environ["DJANGO_SETTINGS_MODULE"] = "marketplace.settings"
        import django

        django.setup()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen([*manage, "run_embedded", "--no-seed", "--cars", str(cars),
                                       "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed = 0
        try:
            connect_s = _wait_fleet(base, cars, server)
            time.sleep(2)  # a first auction round with every car offering, as tests.bench.e2e
            load["fleet_connected"] = _load()
            figures = _run_batch(base, key, batch_body, job_body, requests, max_seconds)
            load["batch_done"] = _load()
        except BaseException:
            sys.stderr.write(log_path.read_text(errors="replace")[-6000:])
            raise
        finally:
            killed = _stop(server)
        batch_id = figures.pop("_batch_id")
        overhead = _overhead(batch_id, batch_body, job_body, repeats, budget_s=40)
        load["end"] = _load()
    return {"bench": "batches", "profile": "embedded", "cars": cars, "requests": requests, "max_chars": chars,
            "upload_bytes": len(batch_body), "connect_s": round(connect_s, 1), "max_seconds": max_seconds, **figures,
            "overhead": overhead, "processes_killed_after_stop": killed, "load_avg_1m": load,
            "cpus": os.cpu_count(), "wall_s": round(time.monotonic() - wall, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--cars", type=int, default=20)
    parser.add_argument("--chars", type=int, default=100, help="Each document cut at this many characters.")
    parser.add_argument("--max-seconds", type=float, default=400, help="From batches.create; then it is cancelled.")
    parser.add_argument("--repeats", type=int, default=7, help="Interleaved pairs per in-process figure.")
    args = parser.parse_args()
    print(json.dumps(main(args.requests, args.cars, args.chars, args.max_seconds, args.repeats)))
