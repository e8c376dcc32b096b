"""Properties of the uniform-price clearing (marketplace.clearing), over random markets."""

import random

from hypothesis import given, settings, strategies as st

from marketplace.clearing import Bid, Offer, clear

prices = st.integers(min_value=0, max_value=5_000_000)
quantities = st.integers(min_value=0, max_value=10_000)
bids_st = st.lists(st.builds(Bid, id=st.integers(1, 10**6), price=prices, quantity=quantities), max_size=12,
                   unique_by=lambda b: b.id)
offers_st = st.lists(st.builds(Offer, id=st.integers(1, 10**6), price=prices, quantity=quantities), max_size=12,
                     unique_by=lambda o: o.id)


def _max_tradable(bids, offers) -> int:
    """Independent reference: the most volume any single price can clear, max over p of min(D(p), S(p))."""
    candidates = {b.price for b in bids} | {o.price for o in offers}
    best = 0
    for p in candidates:
        demand = sum(b.quantity for b in bids if b.price >= p)
        supply = sum(o.quantity for o in offers if o.price <= p)
        best = max(best, min(demand, supply))
    return best


@settings(max_examples=400, deadline=None)
@given(bids_st, offers_st)
def test_clearing_is_individually_rational_never_oversells_and_clears_the_most_volume(bids, offers):
    outcome = clear(bids, offers)
    bid_by_id = {b.id: b for b in bids}
    offer_by_id = {o.id: o for o in offers}
    bought, sold = {}, {}
    for fill in outcome.fills:
        assert fill.quantity > 0
        bought[fill.bid_id] = bought.get(fill.bid_id, 0) + fill.quantity
        sold[fill.offer_id] = sold.get(fill.offer_id, 0) + fill.quantity
        # Winners pay no more than their bid; sellers get no less than their reserve.
        assert outcome.price <= bid_by_id[fill.bid_id].price
        assert outcome.price >= offer_by_id[fill.offer_id].price
    assert all(q <= bid_by_id[i].quantity for i, q in bought.items())
    assert all(q <= offer_by_id[i].quantity for i, q in sold.items())  # capacity never sold twice
    assert outcome.volume == _max_tradable(bids, offers)
    # No one left out would trade at the price: unmet demand above it and unsold supply below it don't coexist.
    if outcome.price is not None:
        unmet = [b for b in bids if bought.get(b.id, 0) < b.quantity and b.price > outcome.price]
        unsold = [o for o in offers if sold.get(o.id, 0) < o.quantity and o.price < outcome.price]
        assert not (unmet and unsold)
    else:
        assert outcome.fills == ()


@settings(max_examples=200, deadline=None)
@given(bids_st, offers_st, st.randoms(use_true_random=False))
def test_clearing_is_deterministic_whatever_the_input_order(bids, offers, rng: random.Random):
    shuffled_bids, shuffled_offers = bids[:], offers[:]
    rng.shuffle(shuffled_bids)
    rng.shuffle(shuffled_offers)
    assert clear(bids, offers) == clear(shuffled_bids, shuffled_offers)


def test_worked_example_price_is_midpoint_of_the_clearing_interval():
    # Given two jobs and two cars, when the best job takes all of the cheapest car and part of the next,
    bids = [Bid(1, 900, 100), Bid(2, 300, 100)]
    offers = [Offer(10, 100, 60), Offer(11, 200, 100)]
    outcome = clear(bids, offers)
    # then job 1 is filled (60 + 40) and job 2 gets the 60 left: job 2 is the marginal bid with demand left
    # unmet, so the price rises to its bid (any lower and it would want more than there is).
    assert [(f.bid_id, f.offer_id, f.quantity) for f in outcome.fills] == [(1, 10, 60), (1, 11, 40), (2, 11, 60)]
    assert outcome.price == 300


def test_price_is_midpoint_when_both_sides_are_exactly_exhausted():
    outcome = clear([Bid(1, 900, 100)], [Offer(10, 100, 100)])
    assert outcome.volume == 100 and outcome.price == 500


def test_no_trade_when_every_bid_is_below_every_reserve():
    outcome = clear([Bid(1, 100, 10)], [Offer(2, 101, 10)])
    assert outcome.price is None and outcome.fills == ()


@settings(max_examples=300, deadline=None)
@given(bids_st, offers_st, st.sets(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6))), st.booleans())
def test_with_consent_every_trade_is_allowed_voluntary_and_capacity_is_not_oversold(bids, offers, refused, refuse_half):
    def compatible(bid_id, offer_id):
        return (bid_id, offer_id) not in refused and not (refuse_half and (bid_id + offer_id) % 2)

    outcome = clear(bids, offers, compatible)
    bid_by_id, offer_by_id = {b.id: b for b in bids}, {o.id: o for o in offers}
    sold, bought = {}, {}
    for fill in outcome.fills:
        assert compatible(fill.bid_id, fill.offer_id)
        assert offer_by_id[fill.offer_id].price <= outcome.price <= bid_by_id[fill.bid_id].price
        sold[fill.offer_id] = sold.get(fill.offer_id, 0) + fill.quantity
        bought[fill.bid_id] = bought.get(fill.bid_id, 0) + fill.quantity
    assert all(q <= offer_by_id[i].quantity for i, q in sold.items())
    assert all(q <= bid_by_id[i].quantity for i, q in bought.items())
