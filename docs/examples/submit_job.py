"""Submit a JSON Lines file as a job to the fleet inference marketplace, wait for it, download the results.

    python docs/examples/submit_job.py --base-url http://127.0.0.1:8000 --api-key mk_... \\
        --input docs.jsonl --out results.jsonl [--model all-minilm-l6-v2] [--max-price 2000000]

Needs only httpx (``pip install httpx``). Defaults: the catalogue's default embedding model at its first
precision, and a bid of the market's last clearing price plus MARGIN (or FALLBACK_PRICE_MICROS when that
market has never traded). The submission carries an Idempotency-Key, so retrying it after a dropped
connection, a 5xx or a 429 can never create two jobs. See docs/api.md."""

import argparse
import math
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx

MARGIN = 0.25  # bid 25 % over the last clearing price: enough to win the next rounds, and you pay the clearing price
FALLBACK_PRICE_MICROS = 1_000_000  # per 10^15 operations, when the market has never traded
RETRIES = 5
POLL_S = 2.0
DONE = {"completed", "cancelled", "expired"}


def call(client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    """One request, retried on connection errors, 5xx and 429 (after Retry-After); other errors end the script
    with the API's message."""
    for attempt in range(RETRIES):
        if attempt:
            for upload in kwargs.get("files", {}).values():
                upload[1].seek(0)  # the file is sent again from its start
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            wait = 2**attempt
            print(f"\n{method} {path}: {exc!r}; retrying in {wait} s", file=sys.stderr)
            time.sleep(wait)
            continue
        busy = response.status_code == 409 and "in_progress" in response.text  # the first try still runs
        if busy or response.status_code == 429 or response.status_code >= 500:
            wait = float(response.headers.get("Retry-After", 2**attempt))
            print(f"\n{method} {path}: HTTP {response.status_code}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
            continue
        if response.is_error:
            error = response.json().get("error", {})
            details = error.get("fields") or error.get("lines") or ""
            sys.exit(f"{method} {path}: HTTP {response.status_code} {error.get('code')}: "
                     f"{error.get('message')} {details}")
        return response
    sys.exit(f"{method} {path}: gave up after {RETRIES} attempts")


def choose_model(client: httpx.Client, slug: str | None) -> dict:
    models = call(client, "GET", "/api/v1/models/").json()
    for model in models:
        if model["slug"] == slug or (slug is None and model["task"] == "embedding" and model["default"]):
            return model
    sys.exit(f"no model {slug!r} in the catalogue: {', '.join(m['slug'] for m in models)}")


def default_bid(client: httpx.Client, precision: str) -> int:
    """The market's last clearing price plus MARGIN (at least 1), in micro-units per 10^15 operations."""
    rounds = call(client, "GET", "/api/v1/rounds/", params={"market": precision, "traded": "true", "limit": 1}).json()
    if not rounds["results"]:
        return FALLBACK_PRICE_MICROS
    return max(1, math.ceil(rounds["results"][0]["clearing_price_micros"] * (1 + MARGIN)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--input", required=True, help="JSON Lines: one {\"text\": ..., \"id\": optional} per line")
    parser.add_argument("--out", required=True, help="where to write the results (JSON Lines, input order)")
    parser.add_argument("--model", help="a model slug (default: the catalogue's default embedding model)")
    parser.add_argument("--max-price", type=int,
                        help="bid, micro-units per 10^15 operations (default: the last clearing price + 25 %%)")
    parser.add_argument("--hours", type=float, default=24, help="deadline, hours from now")
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"}
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=httpx.Timeout(30, read=300)) as client:
        model = choose_model(client, args.model)
        precision = model["precisions"][0]
        bid = args.max_price or default_bid(client, precision)
        deadline = datetime.now(timezone.utc) + timedelta(hours=args.hours)
        with open(args.input, "rb") as inputs:
            job = call(client, "POST", "/api/v1/jobs/", headers={"Idempotency-Key": str(uuid.uuid4())},
                       data={"model": model["slug"], "precision": precision, "max_price_micros": str(bid),
                             "deadline": deadline.isoformat()},
                       files={"inputs": (args.input, inputs, "application/x-ndjson")}).json()
        print(f"job {job['id']}: {job['docs_total']} documents, {job['units_total']} units, {model['slug']} "
              f"{precision}, bid {bid} µ per 10^15 ops "
              f"({job['max_price_per_million_tokens_micros']} µ per million tokens)")

        while job["state"] not in DONE:
            time.sleep(POLL_S)
            job = call(client, "GET", f"/api/v1/jobs/{job['id']}/").json()
            print(f"\rjob {job['id']}: {job['state']:<9} {job['progress_pct']:3d} % "
                  f"({job['units_done']}/{job['units_total']} units)", end="", flush=True)
        print()

        with client.stream("GET", f"/api/v1/jobs/{job['id']}/results/") as response, open(args.out, "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                out.write(chunk)
        print(f"results: {args.out}")
    return 0 if job["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
