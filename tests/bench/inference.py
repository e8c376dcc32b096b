"""Benchmark: the car runtime's embedding throughput per precision on this machine (one thread, units of 8
standard-library docstrings). Ends with one JSON line."""

import json
import time

from fleet.agent.models import MODEL_SLUG, count_tokens, get_runner


def _corpus(n: int) -> list[str]:
    import django

    django.setup()
    from marketplace.corpus import documents

    return [d["text"] for d in documents(n)]


def main(docs: int = 400, seconds: float = 5.0) -> dict:
    texts = _corpus(docs)
    tokens = sum(count_tokens(MODEL_SLUG, texts))
    result = {"bench": "inference", "docs": docs, "tokens": tokens}
    for precision in ("int8", "fp32"):
        runner = get_runner(MODEL_SLUG, precision)
        runner.embed(texts[:8])  # warm up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds and done < docs:
            runner.embed(texts[done:done + 8])
            done += 8
        elapsed = time.perf_counter() - started
        result[f"{precision}_docs_per_s"] = round(done / elapsed, 1)
    return result


if __name__ == "__main__":
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
    print(json.dumps(main()))
