"""Properties of the joint clearing (marketplace.clearing) over random rounds, held to an LP solved by HiGHS."""

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from marketplace import clearing
from marketplace.clearing import Bid, Book, Fill, Offer, clear, clear_book, lp_reference, surplus

pytestmark = pytest.mark.pure  # no database, layer or broker: the same code in every profile

MARKETS = ["int8", "fp8", "fp16", "fp32"]
REL = 1e-9  # the surplus must match the LP's to this relative tolerance
SLACK = 1e-7  # prices and profits are compared with this relative slack (the duals come from a float LP)

quantities = st.integers(min_value=0, max_value=10_000)
spread_prices = st.integers(min_value=0, max_value=5_000_000)
tied_prices = st.integers(min_value=0, max_value=5).map(lambda p: p * 100_000)  # few values: ties everywhere


@st.composite
def rounds(draw, max_markets: int = 4, size: int = 12):
    """Bids and offers over one to four markets; each offer serves a random set of them (so sets overlap),
    prices either spread out or drawn from a handful of values, quantities and capacities possibly zero."""
    markets = draw(st.lists(st.sampled_from(MARKETS[:max_markets]), min_size=1, max_size=max_markets, unique=True))
    prices = draw(st.sampled_from([spread_prices, tied_prices]))
    bids = draw(st.lists(st.builds(Bid, id=st.integers(1, 10**6), market=st.sampled_from(markets), price=prices,
                                   quantity=quantities), max_size=size, unique_by=lambda b: b.id))
    offers = draw(st.lists(st.builds(Offer, id=st.integers(1, 10**6), price=prices,
                                     capacity=st.dictionaries(st.sampled_from(markets), quantities, min_size=1)),
                           max_size=size, unique_by=lambda o: o.id))
    return bids, offers


def totals(book: Book, cleared) -> tuple[np.ndarray, np.ndarray]:
    """Mega-ops each bid bought, and (offers x markets) mega-ops each offer sold."""
    bought = np.bincount(cleared.fill_bid, cleared.fill_quantity, len(book.bid_id))
    sold = np.zeros_like(book.offer_capacity)
    np.add.at(sold, (cleared.fill_offer, book.bid_market[cleared.fill_bid]), cleared.fill_quantity)
    return bought, sold


def assert_voluntary_and_feasible(book: Book, cleared) -> None:
    """Every winner pays at most its bid and every seller earns at least its reserve, at the price charged;
    no bid gets more than it asked for; no offer sells more than its interval (capacity never sold twice)."""
    bought, sold = totals(book, cleared)
    for j, i, quantity in zip(cleared.fill_bid, cleared.fill_offer, cleared.fill_quantity):
        assert quantity > 0
        price = cleared.prices[book.bid_market[j]]
        assert book.offer_price[i] <= price <= book.bid_price[j]
    assert np.all(bought <= book.bid_quantity * (1 + REL))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(sold > 0, sold / book.offer_capacity, 0.0).sum(1)
    assert np.all(share <= 1 + REL)


def assert_market_clearing(book: Book, cleared) -> None:
    """At the clearing prices every agent has its own best choice: a bid above its market's price is served in
    full, one below it not at all; an offer sells its whole interval if some market pays more than its
    reserve, and only to markets where capacity x (price - reserve) is highest. So no bid left wanting and
    offer left with time could trade at the prices."""
    bought, sold = totals(book, cleared)
    p = np.array([np.nan if d is None else d for d in cleared.duals])
    tol = SLACK * np.maximum(1.0, np.abs(p))
    for j, market in enumerate(book.bid_market):
        if book.bid_quantity[j] == 0 or np.isnan(p[market]):
            continue
        if book.bid_price[j] > p[market] + tol[market]:
            assert bought[j] == pytest.approx(book.bid_quantity[j], rel=REL)
        if book.bid_price[j] < p[market] - tol[market]:
            assert bought[j] == 0
    for i, capacity in enumerate(book.offer_capacity):
        serves = (capacity > 0) & ~np.isnan(p)
        if not serves.any():
            continue
        profit = np.where(serves, capacity * (np.nan_to_num(p) - book.offer_price[i]), -np.inf)
        best, slack = max(0.0, profit.max()), SLACK * capacity.max() * max(1.0, np.nanmax(np.abs(p)))
        share = (sold[i][serves] / capacity[serves]).sum()
        if best > slack:
            assert share == pytest.approx(1.0, rel=1e-7)  # it works the whole interval
        assert np.all(profit[sold[i] > 0] >= best - slack)  # and only where it earns most
    for market in range(len(book.markets)):
        wanting = (book.bid_market == market) & (bought < book.bid_quantity * (1 - REL))
        used = (sold / np.maximum(book.offer_capacity, 1e-300)).sum(1)
        idle = (book.offer_capacity[:, market] > 0) & (used < 1 - 1e-7)
        if not np.isnan(p[market]):
            assert not ((book.bid_price[wanting] > p[market] + tol[market]).any()
                        and (book.offer_price[idle] < p[market] - tol[market]).any())


@settings(deadline=None)
@given(rounds(), st.sampled_from([600, 0]))
def test_joint_clearing_is_voluntary_feasible_market_clearing_and_as_good_as_the_lp(round_, lp_below):
    # Given a random round (lp_below=0 drives the estimate-and-box path that large rounds take),
    bids, offers = round_
    book = Book.of(bids, offers)
    # when it clears,
    cleared = clear_book(book, lp_below=lp_below)
    # then trades are voluntary and feasible, the prices clear the markets, and the surplus is the LP's.
    assert_voluntary_and_feasible(book, cleared)
    assert_market_clearing(book, cleared)
    best = lp_reference(book)
    assert surplus(book, cleared) == pytest.approx(best, rel=REL, abs=1e-6)


@settings(deadline=None)
@given(rounds(), st.randoms(use_true_random=False))
def test_clearing_is_deterministic_whatever_the_input_order(round_, rng: random.Random):
    bids, offers = round_
    shuffled_bids, shuffled_offers = bids[:], offers[:]
    rng.shuffle(shuffled_bids)
    rng.shuffle(shuffled_offers)
    assert clear(bids, offers) == clear(shuffled_bids, shuffled_offers)


def test_larger_rounds_take_the_estimate_and_box_path_and_match_the_lp():
    # Given rounds big enough to be estimated first (four overlapping markets, and one),
    rng = np.random.default_rng(5)
    for markets in (4, 1):
        n = 3_000
        serves = rng.random((n, markets)) < 0.5
        serves[np.arange(n), rng.integers(0, markets, n)] = True
        book = Book(tuple(MARKETS[:markets]), np.arange(n), rng.integers(0, markets, n),
                    rng.integers(1_000, 5_000_000, n).astype(float), rng.integers(1_000, 500_000, n).astype(float),
                    np.arange(n), rng.integers(0, 4_000_000, n).astype(float),
                    np.where(serves, rng.integers(10_000, 400_000, (n, markets)), 0).astype(float))
        cleared = clear_book(book)
        # then the outcome is as good as the LP's, and voluntary, feasible and market-clearing.
        assert surplus(book, cleared) == pytest.approx(lp_reference(book), rel=REL)
        assert_voluntary_and_feasible(book, cleared)
        assert_market_clearing(book, cleared)


def test_a_price_on_a_reserve_many_cars_share_is_solved_by_adding_them_as_needed(monkeypatch):
    # Given an idle fleet: most cars keep the same reserve and serve several markets, supply exceeds demand,
    # so every market clears at that reserve and those cars are all indifferent there;
    rng = np.random.default_rng(8)
    n_bids, n_offers, markets = 400, 3_000, 4
    serves = rng.random((n_offers, markets)) < 0.5
    serves[np.arange(n_offers), rng.integers(0, markets, n_offers)] = True
    reserves = np.where(rng.random(n_offers) < 0.6, 100_000, rng.integers(0, 5_000_000, n_offers))
    book = Book(tuple(MARKETS), np.arange(n_bids), rng.integers(0, markets, n_bids),
                rng.integers(1_000, 5_000_000, n_bids).astype(float),
                rng.integers(1_000, 500_000, n_bids).astype(float), np.arange(n_offers), reserves.astype(float),
                np.where(serves, rng.integers(10_000, 400_000, (n_offers, markets)), 0).astype(float))
    # when the margin LP first gets only a few of them (the rest added while some would profit),
    monkeypatch.setattr(clearing, "_MARGIN_OFFERS", 20)
    cleared = clear_book(book, lp_below=0)
    # then the outcome is still the LP's, voluntary, feasible and market-clearing, at the shared reserve.
    assert cleared.prices == [100_000] * markets
    assert surplus(book, cleared) == pytest.approx(lp_reference(book), rel=REL)
    assert_voluntary_and_feasible(book, cleared)
    assert_market_clearing(book, cleared)


def _walk_surplus(bids: list[Bid], offers: list[Offer]) -> float:
    """Independent single-market reference: match bids by price descending with offers by price ascending
    while the bid is at least the reserve, summing (bid - reserve) x quantity."""
    demand = sorted(([b.price, b.quantity] for b in bids if b.quantity), key=lambda x: -x[0])
    supply = sorted(([o.price, q] for o in offers for q in o.capacity.values() if q), key=lambda x: x[0])
    total, i, j = 0.0, 0, 0
    while i < len(demand) and j < len(supply) and demand[i][0] >= supply[j][0]:
        q = min(demand[i][1], supply[j][1])
        total += (demand[i][0] - supply[j][0]) * q
        demand[i][1] -= q
        supply[j][1] -= q
        i += demand[i][1] == 0
        j += supply[j][1] == 0
    return total


@settings(deadline=None)
@given(rounds(max_markets=1))
def test_one_market_clears_like_the_classic_sorted_walk(round_):
    bids, offers = round_
    book = Book.of(bids, offers)
    cleared = clear_book(book)
    assert surplus(book, cleared) == pytest.approx(_walk_surplus(bids, offers), rel=REL, abs=1e-6)
    assert_voluntary_and_feasible(book, cleared)


def test_one_market_worked_example_price_is_the_marginal_bid():
    # Given two jobs and two cars, when the best job takes all of the cheapest car and part of the next,
    outcome = clear([Bid(1, "int8", 900, 100), Bid(2, "int8", 300, 100)],
                    [Offer(10, 100, {"int8": 60}), Offer(11, 200, {"int8": 100})])
    # then job 1 is filled (60 + 40) and job 2 gets the 60 left: job 2 is the marginal bid with demand left
    # unmet, so the price rises to its bid (any lower and it would want more than there is).
    assert [(f.bid_id, f.offer_id, f.quantity) for f in outcome.fills] == [(1, 10, 60), (1, 11, 40), (2, 11, 60)]
    assert outcome.prices == {"int8": 300}


def test_price_is_midpoint_when_both_sides_are_exactly_exhausted():
    outcome = clear([Bid(1, "int8", 900, 100)], [Offer(10, 100, {"int8": 100})])
    assert outcome.fills == (Fill(1, 10, 100),) and outcome.prices == {"int8": 500}


def test_no_trade_when_every_bid_is_below_every_reserve():
    outcome = clear([Bid(1, "int8", 100, 10)], [Offer(2, 101, {"int8": 10})])
    assert outcome.prices == {"int8": None} and outcome.fills == ()


def test_ties_at_the_price_are_served_lowest_id_first():
    # Three equal bids at the price compete for 150 mega-ops: the lower ids are served first.
    outcome = clear([Bid(3, "int8", 500, 100), Bid(1, "int8", 500, 100), Bid(2, "int8", 500, 100)],
                    [Offer(10, 100, {"int8": 150})])
    assert outcome.prices == {"int8": 500}
    assert [(f.bid_id, f.quantity) for f in outcome.fills] == [(1, 100), (2, 50)]


def test_worked_example_of_three_markets_from_docs_auction_md():
    # Given the example of docs/auction.md: four jobs in three markets and three cars, each serving two,
    bids = [Bid(1, "int8", 900, 300), Bid(2, "fp16", 800, 100), Bid(3, "fp32", 600, 100), Bid(4, "int8", 400, 200)]
    offers = [Offer(10, 100, {"int8": 400, "fp16": 200}), Offer(11, 200, {"fp16": 100, "fp32": 50}),
              Offer(12, 300, {"int8": 200, "fp32": 100})]
    outcome = clear(bids, offers)
    # then every car spends its whole interval in one market, the one it earns most in at the prices,
    assert sorted((f.bid_id, f.offer_id, f.quantity) for f in outcome.fills) == [
        (1, 10, 300), (2, 11, 100), (3, 12, 100), (4, 10, 100)]
    # the prices are the midpoints of the dual lattice: INT8 400 (job 4 is left wanting at its bid), FP16 in
    # [350, 700], FP32 in [500, 600],
    assert outcome.prices == {"int8": 400, "fp16": 525, "fp32": 550}
    # and the surplus is the LP's, 5,000 more than clearing the markets one after another, best bid first.
    book = Book.of(bids, offers)
    assert surplus(book, clear_book(book)) == lp_reference(book) == 360_000


@settings(deadline=None)
@given(rounds(), st.data())
def test_with_refusals_every_trade_is_consented_voluntary_and_capacity_is_not_oversold(round_, data):
    bids, offers = round_
    pairs = [(b.id, o.id) for b in bids for o in offers]
    refused = data.draw(st.lists(st.sampled_from(pairs), unique=True) if pairs else st.just([]))
    book = Book.of(bids, offers)
    cleared = clear_book(book, refused=book.index(refused))
    traded = {(int(book.bid_id[j]), int(book.offer_id[i])) for j, i in zip(cleared.fill_bid, cleared.fill_offer)}
    assert not traded & set(refused)
    assert_voluntary_and_feasible(book, cleared)
    # No better than the best over consenting pairs; as good as the refusal-free optimum when that one can be
    # served by consenting pairs alone.
    consenting_best = lp_reference(book, refused=book.index(refused))
    assert surplus(book, cleared) <= consenting_best * (1 + REL) + 1e-6
    if consenting_best == pytest.approx(lp_reference(book), rel=REL, abs=1e-6):
        assert surplus(book, cleared) == pytest.approx(consenting_best, rel=REL, abs=1e-6)
    shuffled = refused[::-1]
    assert clear(bids, offers, refused) == clear(bids[::-1], offers[::-1], shuffled)


def test_a_refusal_that_one_price_cannot_honour_keeps_the_best_voluntary_price():
    # Given a cheap car that refuses the dearest job, and a dear car,
    bids = [Bid(1, "int8", 1000, 100), Bid(2, "int8", 500, 100)]
    offers = [Offer(10, 0, {"int8": 100}), Offer(11, 800, {"int8": 100})]
    # (without the refusal job 1 would buy car 10's capacity),
    assert clear(bids, offers).fills == (Fill(1, 10, 100),)
    outcome = clear(bids, offers, [(1, 10)])
    # then pairing job 1 with car 11 and job 2 with car 10 would need two prices (800 <= p <= 500). Of the
    # single-price outcomes, job 2 with car 10 (surplus 50,000) beats job 1 with car 11 (20,000); the price
    # is the midpoint of [0, 500].
    assert outcome.fills == (Fill(2, 10, 100),) and outcome.prices == {"int8": 250}


@pytest.mark.parametrize("factor", [10**4, 10**6])
def test_dear_prices_up_to_the_apis_limit_clear_like_cheap_ones(factor):
    """The API accepts bids up to 10^12 micro-units per compute unit; the LP solver lost its way with such
    costs until prices were solved on a smaller scale. The same round at prices times ``factor`` sells the same
    quantities to the same pairs, at prices times ``factor`` (to the rounding of a micro-unit)."""
    bids = [clearing.Bid(id=1, market="int8", price=900_000, quantity=54_360),
            clearing.Bid(id=2, market="int8", price=300_000, quantity=90_000),
            clearing.Bid(id=3, market="fp32", price=700_000, quantity=20_000)]
    offers = [clearing.Offer(id=7, price=100_000, capacity={"int8": 100_000, "fp32": 10_000}),
              clearing.Offer(id=8, price=450_000, capacity={"int8": 50_000, "fp32": 5_000})]
    cheap = clearing.clear(bids, offers)
    dear = clearing.clear([dataclasses.replace(b, price=b.price * factor) for b in bids],
                          [dataclasses.replace(o, price=o.price * factor) for o in offers])
    assert [(f.bid_id, f.offer_id, round(f.quantity, 6)) for f in dear.fills] == \
           [(f.bid_id, f.offer_id, round(f.quantity, 6)) for f in cheap.fills]
    for market, price in cheap.prices.items():
        assert (price is None) == (dear.prices[market] is None)
        if price is not None:
            assert abs(dear.prices[market] - price * factor) <= factor
