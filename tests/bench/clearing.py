"""Benchmark: the pure clearing function on a large random market. Ends with one JSON line."""

import json
import random
import time

from marketplace.clearing import Bid, Offer, clear


def main(bids: int = 5_000, offers: int = 20_000, repeats: int = 5) -> dict:
    rng = random.Random(7)
    bid_list = [Bid(i, rng.randint(1_000, 5_000_000), rng.randint(1_000, 500_000)) for i in range(bids)]
    offer_list = [Offer(i, rng.randint(0, 4_000_000), rng.randint(10_000, 400_000)) for i in range(offers)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outcome = clear(bid_list, offer_list)
        times.append(time.perf_counter() - started)
    return {"bench": "clearing", "bids": bids, "offers": offers, "fills": len(outcome.fills),
            "median_ms": round(sorted(times)[repeats // 2] * 1000, 2)}


if __name__ == "__main__":
    print(json.dumps(main()))
