"""Benchmark: the joint clearing (marketplace.clearing) of n bids and n offers, from 10^3 to 10^6, over four
overlapping precision markets and over one, held to the plain LP (HiGHS) where that finishes within its cap.
Progress goes to stderr; the last line on stdout is one JSON object:

    clear_s              seconds per clearing, four markets, by size ("1e3" ... "1e6"), median of a few runs
    clear_s_1class       the same with one market
    lp_s                 seconds HiGHS takes on the same four-market rounds, where it finished within the cap
    lp_s_1class          the same with one market
    surplus_ratio_vs_lp  the least ratio of the clearing's surplus to the LP's, over every round both solved

The clearing is timed on the columnar book (marketplace.clearing.Book), as a round of that size would hand it
over; building a million Bid objects would time Python, not the auction.
"""

import argparse
import json
import multiprocessing
import queue
import statistics
import sys
import time

import numpy as np

from marketplace.clearing import Book, clear_book, lp_reference, surplus

MARKETS = ("int8", "fp8", "fp16", "fp32")
SIZES = {"1e3": 1_000, "1e4": 10_000, "1e5": 100_000, "1e6": 1_000_000}


def round_of(n: int, markets: int, seed: int) -> Book:
    """n bids and n offers. A bid: one market, 1,000 to 5,000,000 micro-units per compute unit, 1,000 to
    500,000 mega-ops. An offer: a reserve of 0 to 4,000,000; each market served with probability one half (at
    least one, so with four markets every one of the 15 sets occurs), at the car's own rate: 10,000 to 400,000
    mega-ops per interval in each, so every car converts its time between markets differently."""
    rng = np.random.default_rng(seed)
    serves = rng.random((n, markets)) < 0.5
    serves[np.arange(n), rng.integers(0, markets, n)] = True
    return Book(markets=MARKETS[:markets], bid_id=np.arange(n), bid_market=rng.integers(0, markets, n),
                bid_price=rng.integers(1_000, 5_000_000, n).astype(float),
                bid_quantity=rng.integers(1_000, 500_000, n).astype(float), offer_id=np.arange(n),
                offer_price=rng.integers(0, 4_000_000, n).astype(float),
                offer_capacity=np.where(serves, rng.integers(10_000, 400_000, (n, markets)), 0).astype(float))


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _lp_child(n: int, markets: int, seed: int, results) -> None:
    results.put(timed(lambda: lp_reference(round_of(n, markets, seed))))


def lp_within(n: int, markets: int, seed: int, cap: float) -> tuple[float, float] | None:
    """(optimal surplus, seconds) of the LP on the same round, or None past ``cap`` seconds. HiGHS's own time
    limit is not checked in every phase (a 20 s limit ran 130 s at 1e5), so the LP runs in a child process
    that is ended when the cap passes."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_lp_child, args=(n, markets, seed, results), daemon=True)
    child.start()
    try:
        return results.get(timeout=cap)
    except queue.Empty:
        return None
    finally:
        child.terminate()
        child.join()


def main(lp_sizes: list[str], lp_cap: float) -> dict:
    figures = {"clear_s": {}, "clear_s_1class": {}, "lp_s": {}, "lp_s_1class": {}}
    ratios = []
    for markets, suffix in ((4, ""), (1, "_1class")):
        for label, n in SIZES.items():
            book = round_of(n, markets, n + markets)
            runs = 3 if n >= 100_000 else 5
            times = []
            for _ in range(runs):
                cleared, seconds = timed(lambda: clear_book(book))
                times.append(seconds)
            figures["clear_s" + suffix][label] = round(statistics.median(times), 4)
            ours = surplus(book, cleared)
            print(f"{markets} market(s) {label}: clear {statistics.median(times):.3f} s", file=sys.stderr, flush=True)
            if label not in lp_sizes:
                continue
            solved = lp_within(n, markets, n + markets, lp_cap)
            if solved is None:
                print(f"{markets} market(s) {label}: LP over its {lp_cap:g} s cap", file=sys.stderr, flush=True)
                continue
            best, seconds = solved
            figures["lp_s" + suffix][label] = round(seconds, 3)
            ratios.append(ours / best)
            print(f"{markets} market(s) {label}: LP {seconds:.2f} s, surplus ratio {ours / best:.15f}",
                  file=sys.stderr, flush=True)
    figures["surplus_ratio_vs_lp"] = min(ratios) if ratios else None
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lp-sizes", default="1e3,1e4,1e5", help="sizes the LP reference also solves")
    parser.add_argument("--lp-cap", type=float, default=60.0, help="seconds HiGHS may take per round")
    args = parser.parse_args()
    print(json.dumps(main(args.lp_sizes.split(","), args.lp_cap)))
