"""The joint clearing of every market (precision class) of an auction round. Pure numpy and HiGHS, no ORM.

A sealed-bid, uniform-price double auction in which a car that runs several precisions sells each second of
its interval once, to whichever markets make the most of it. docs/auction.md explains the mechanism and
works an example.

Model. A bid (a job) wants up to ``quantity`` mega-ops of one market at up to ``price`` micro-units per
compute unit. An offer (a car) has a reserve ``price`` per compute unit and, for each market it serves, a
``capacity``: the mega-ops it would deliver if it spent the whole interval on that market (its measured rate
in that precision times the seconds it will be parked). Selling x mega-ops into market k uses the share
x / capacity[k] of its interval, and the shares sum to at most one: seconds are what a car really has, and
each precision converts them at the car's own measured rate. The allocation maximises the surplus
sum(bid price x bought) - sum(reserve x sold), a linear programme (LP).

Prices. The LP's dual gives each market a price p_k at which every agent's allocation is its own best
choice: a bid above p_k is served in full and one below it not at all; a car sells its whole interval to the
market where capacity[k] x (p_k - reserve) is largest, if that is positive, and nothing if every such profit
is negative. So winners pay at most their bid, cars earn at least their reserve, and nobody left wanting
would trade at the prices. The dual optima form a lattice (the dual is submodular); the clearing price is
the midpoint of its least and greatest points, clipped to the range of the round's prices. With one market
this is today's midpoint of [low, high]. The price charged is that midpoint rounded down to a whole
micro-unit, kept inside [dearest reserve that sold, lowest bid that bought].

Solving. The dual is a convex piecewise-linear function of at most four prices. A smoothed version of it is
minimised by Newton's method, first on a subsample, then on the agents near the estimate, which puts every
price within a small box. Each bid whose price lies outside the box, and each car whose best choice is the
same everywhere in it, is settled by that choice. HiGHS solves the LP of the agents left (tens to hundreds,
with the settled ones as constants, alike agents as one column, and for each market a buyer at the box's
floor and a seller at its ceiling, so the LP is the dual minimised over the box). A box that turns out not to
contain the optimal prices (one of those box traders trades, or an extreme dual price sits on its face)
grows, so the result is the exact LP optimum whatever the estimate was. The marginal agents are the one
place where no closed form exists: a car splitting its interval between markets at its own rates makes the
problem a generalised flow.

Ties and determinism. Inputs are taken in id order; at the clearing price, bids at the price are served
lowest job id first and cars whose reserve equals it sell lowest car id first. Fills pair each market's
buyers with its sellers in id order. The outcome is a function of the inputs alone.

Refusals (an owner's consent). A refused (job, car) pair may not trade. The clearing first ignores them and
routes each market's trades to consenting pairs; when that succeeds (the usual case) the outcome is the
exact optimum above. When it cannot, the round is solved as an LP over consenting (job, car) pairs. One
uniform price per market cannot always support that allocation (a car that refuses the dearest job may be
cheaper than the car serving it); such a market gets the threshold price that separates its buyers from its
sellers with the most surplus, and its price is the midpoint of [dearest reserve that sold, lowest bid that
bought].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from highspy import _core as highs  # not the public wrapper: it prints a banner on construction

_PRICE_SCALE = 2.0**20  # prices are solved divided by a power of two that brings them to at most about this
_TOL = 1e-9  # relative: a share, price or profit within it of a bound counts as at the bound
_LP_BELOW = 600  # bids + offers up to which the LP takes the whole round, without an estimate first
_SAMPLE = 20_000  # bids and offers each in the subsample that gives the first estimate
_BOX_TRIES = 10  # box enlargements before the box spans every price of the round
_MARGIN_OFFERS = 2_000  # offers that may be best in several markets given to the margin LP at first


# --- object API ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bid:
    id: int
    market: str
    price: int  # at most, micro-units per compute unit
    quantity: int  # mega-ops wanted


@dataclass(frozen=True)
class Offer:
    id: int
    price: int  # reserve, micro-units per compute unit
    capacity: dict[str, int]  # market -> mega-ops if the whole interval went to that market


@dataclass(frozen=True)
class Fill:
    bid_id: int
    offer_id: int
    quantity: float  # mega-ops of the bid's market


@dataclass(frozen=True)
class Outcome:
    prices: dict[str, int | None]  # the price charged per market, micro-units per compute unit; None: no trade
    duals: dict[str, float | None]  # the unrounded clearing price per market; None: no bids or no offers
    fills: tuple[Fill, ...]


def clear(bids: list[Bid], offers: list[Offer], refused: list[tuple[int, int]] | None = None) -> Outcome:
    """Clear one round of every market jointly. ``refused`` lists (bid id, offer id) pairs that may not
    trade. Input order does not matter."""
    book = Book.of(bids, offers)
    cleared = clear_book(book, refused=book.index(refused or []))
    return Outcome(
        prices=dict(zip(book.markets, cleared.prices)),
        duals=dict(zip(book.markets, cleared.duals)),
        fills=tuple(Fill(int(book.bid_id[j]), int(book.offer_id[i]), float(x))
                    for j, i, x in zip(cleared.fill_bid, cleared.fill_offer, cleared.fill_quantity)),
    )


# --- columnar API -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Book:
    """A round's bids and offers as arrays (what :func:`clear` builds; benchmarks pass it directly): n bids
    and m offers, each side in ascending id order, over K markets."""

    markets: tuple[str, ...]
    bid_id: np.ndarray  # (n,) int
    bid_market: np.ndarray  # (n,) index into markets
    bid_price: np.ndarray  # (n,)
    bid_quantity: np.ndarray  # (n,) mega-ops
    offer_id: np.ndarray  # (m,) int
    offer_price: np.ndarray  # (m,) reserve
    offer_capacity: np.ndarray  # (m, K) mega-ops per market for the whole interval, >= 0; 0: not served

    @classmethod
    def of(cls, bids: list[Bid], offers: list[Offer]) -> Book:
        bids, offers = sorted(bids, key=lambda b: b.id), sorted(offers, key=lambda o: o.id)
        markets = tuple(sorted({b.market for b in bids} | {m for o in offers for m in o.capacity}))
        column = {market: k for k, market in enumerate(markets)}
        capacity = np.zeros((len(offers), len(markets)))
        for i, offer in enumerate(offers):
            for market, quantity in offer.capacity.items():
                capacity[i, column[market]] = max(quantity, 0)
        return cls(markets=markets, bid_id=np.array([b.id for b in bids], dtype=np.int64),
                   bid_market=np.array([column[b.market] for b in bids], dtype=np.int64),
                   bid_price=np.array([b.price for b in bids], dtype=float),
                   bid_quantity=np.array([b.quantity for b in bids], dtype=float),
                   offer_id=np.array([o.id for o in offers], dtype=np.int64),
                   offer_price=np.array([o.price for o in offers], dtype=float), offer_capacity=capacity)

    def index(self, pairs) -> np.ndarray:
        """(bid id, offer id) pairs as a (r, 2) array of (bid index, offer index); unknown ids are dropped."""
        bid_at = {int(i): j for j, i in enumerate(self.bid_id)}
        offer_at = {int(i): j for j, i in enumerate(self.offer_id)}
        found = sorted({(bid_at[j], offer_at[i]) for j, i in pairs if j in bid_at and i in offer_at})
        return np.array(found, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class Cleared:
    """The outcome of :func:`clear_book`: per market its price and dual, and the fills as arrays of indices
    into the book's bids and offers with the mega-ops traded."""

    prices: list[int | None]
    duals: list[float | None]
    fill_bid: np.ndarray
    fill_offer: np.ndarray
    fill_quantity: np.ndarray


def clear_book(book: Book, *, refused: np.ndarray | None = None, lp_below: int = _LP_BELOW) -> Cleared:
    """Clear a book. ``refused``: (r, 2) array of (bid index, offer index) pairs that may not trade.
    ``lp_below``: rounds with at most this many bids + offers go to the LP whole (tests set it to 0 to drive
    the estimate-and-box path on small rounds)."""
    for ids in (book.bid_id, book.offer_id):
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            raise ValueError("bid and offer ids must be unique and ascending")
    K = len(book.markets)
    capacity = book.offer_capacity.astype(float, copy=False)
    live = book.bid_quantity > 0
    demanded = np.bincount(book.bid_market[live], minlength=K) > 0
    if not demanded.all():
        capacity = capacity * demanded  # no demand: nothing to sell there
    serves = capacity > 0
    active = demanded & serves.any(0)
    bids = np.flatnonzero(live & active[book.bid_market])
    offers = np.flatnonzero(serves.any(1))
    duals: list[float | None] = [None] * K
    prices: list[int | None] = [None] * K
    empty = np.zeros(0, dtype=np.int64)
    if not len(bids) or not len(offers):
        return Cleared(prices, duals, empty, empty, np.zeros(0))
    markets = np.flatnonzero(active)
    column = np.full(K, -1)
    column[markets] = np.arange(len(markets))
    b = _take(book.bid_price, bids).astype(float, copy=False)
    c = _take(book.offer_price, offers).astype(float, copy=False)
    # Prices are solved on a scale of about 10^6 (a power of two, so exact): HiGHS loses its way with costs of
    # 10^10 and more times quantities of 10^5, and the API accepts bids up to 10^12.
    scale = 2.0 ** max(0, math.ceil(math.log2(max(b.max(), c.max(), 1.0) / _PRICE_SCALE)))
    mk = _Market(cls=_take(column[book.bid_market], bids), b=b / scale, q=_take(book.bid_quantity, bids).astype(float, copy=False),
                 c=c / scale, Q=_take(capacity, offers) if len(markets) == K else capacity[np.ix_(offers, markets)])
    solution = _solve(mk, lp_below)
    fills = _pair(mk, solution.y, solution.X)
    p = solution.p
    if refused is not None and len(refused):
        keep = np.full(len(book.bid_id), -1)
        keep[bids] = np.arange(len(bids))
        held = np.full(len(book.offer_id), -1)
        held[offers] = np.arange(len(offers))
        j, i = keep[refused[:, 0]], held[refused[:, 1]]
        banned = {(a, z) for a, z in zip(j.tolist(), i.tolist()) if a >= 0 and z >= 0}
        if banned:
            fills = _route_consenting(mk, solution.y, solution.X, banned)
            if fills is None:
                fills, p = _clear_consenting(mk, banned, solution)
    fill_bid, fill_offer, fill_quantity = fills
    p = p * scale
    for k in range(mk.K):
        sold = mk.cls[fill_bid] == k
        duals[markets[k]] = float(p[k])
        if sold.any():
            prices[markets[k]] = _whole_price(p[k], c[fill_offer[sold]].max(), b[fill_bid[sold]].min())
    return Cleared(prices, duals, bids[fill_bid], offers[fill_offer], fill_quantity)


def _take(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows], without a copy when rows are all of them."""
    return values if len(rows) == len(values) else values[rows]


def surplus(book: Book, cleared: Cleared) -> float:
    """Total surplus of a clearing: sum over fills of (bid price - reserve) x quantity."""
    return float(((book.bid_price[cleared.fill_bid] - book.offer_price[cleared.fill_offer])
                  * cleared.fill_quantity).sum())


def _whole_price(dual: float, dearest_reserve: float, lowest_bid: float) -> int:
    """The price charged: the dual rounded down to a whole micro-unit, inside the interval that keeps every
    trade of the market voluntary (bids and reserves are whole micro-units)."""
    low, high = int(round(dearest_reserve)), int(round(lowest_bid))
    if low > high:
        raise ArithmeticError(f"no voluntary price: reserve {low} sold, bid {high} bought")
    return min(max(int(np.floor(dual + max(1e-6, _TOL * abs(dual)))), low), high)


# --- the exact joint clearing -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Market:
    """The round's live agents, in id order: n bids (market index, price, mega-ops) and m offers (reserve,
    mega-ops per market for the whole interval), over K markets that each have bids and offers."""

    cls: np.ndarray
    b: np.ndarray
    q: np.ndarray
    c: np.ndarray
    Q: np.ndarray

    @property
    def K(self) -> int:
        return self.Q.shape[1]


@dataclass(frozen=True)
class _Solution:
    y: np.ndarray  # (n,) mega-ops each bid buys
    X: np.ndarray  # (m, K) mega-ops each offer sells into each market
    p: np.ndarray  # (K,) clearing prices (midpoint of the dual lattice)


@dataclass
class _Box:
    """Every agent's fate over a box of prices [L, U]: bids 1 (served in full), 0 (not served) or -1
    (near: the LP decides); offers k >= 0 (sells its interval to market k), -1 (idle) or -2 (near)."""

    L: np.ndarray
    U: np.ndarray
    bid: np.ndarray
    offer: np.ndarray
    settled: np.ndarray  # per market, supply minus demand of the settled agents


def _solve(mk: _Market, lp_below: int) -> _Solution:
    """The exact joint clearing: estimate a box of prices, settle the agents it decides, solve the rest by LP,
    and grow the box until its optimum is the round's (module docstring)."""
    K = mk.K
    lo, hi = min(mk.b.min(), mk.c.min()), max(mk.b.max(), mk.c.max())
    floor, ceil = np.full(K, lo - 1.0), np.full(K, hi + 1.0)  # a box this wide holds every optimum
    if len(mk.b) + len(mk.c) <= lp_below:
        L, U, wide = floor, ceil, None
    else:
        wide = _estimate(mk, lo, hi, floor, ceil)
        L, U = wide.L, wide.U
    for attempt in range(_BOX_TRIES + 1):
        if attempt == _BOX_TRIES:
            L, U = floor, ceil
        if wide is not None and np.array_equal(L, wide.L) and np.array_equal(U, wide.U):
            box = wide
        elif wide is not None and np.all(L >= wide.L) and np.all(U <= wide.U):
            box = _classify(mk, L, U, within=wide)
        else:
            box = _classify(mk, L, U)
        margin = _margin(mk, box)
        grow_down, grow_up = margin.buyer, margin.seller
        if not (grow_down.any() or grow_up.any()):
            low, high = _dual_extremes(mk, box, margin, lo, hi)
            step = _TOL * np.maximum(1.0, np.abs(box.U))
            grow_down = (low <= box.L + step) & (box.L > floor)
            grow_up = (high >= box.U - step) & (box.U < ceil)
            if not (grow_down.any() or grow_up.any()):
                p = (low + high) / 2
                y, X = _allocate(mk, box, p, margin)
                return _Solution(y, X, p)
        width = box.U - box.L
        L = np.where(grow_down, np.maximum(box.L - 3 * width, floor), box.L)
        U = np.where(grow_up, np.minimum(box.U + 3 * width, ceil), box.U)
    raise AssertionError("the box spanning every price always holds the optimum")


def _margin(mk: _Market, box: _Box) -> _Margin:
    """The LP of the agents the box left near (:func:`_residual_lp`), adding offers it left out while any
    would profit at its prices (column generation); the ones still left out stay idle."""
    wanted = np.zeros(0, dtype=np.int64)
    for _ in range(_BOX_TRIES):
        margin = _residual_lp(mk, box, wanted)
        out = margin.offers[margin.left_out]
        profit = mk.Q[out] * (margin.prices - mk.c[out, None])
        slack = _TOL * mk.Q[out] * np.maximum(1.0, np.abs(margin.prices))
        keen = (margin.candidate[margin.left_out] & (profit > slack)).any(1)
        if not keen.any():
            return margin
        wanted = np.union1d(wanted, out[keen][:max(_MARGIN_OFFERS, 2 * len(wanted))])
    return _residual_lp(mk, box, margin.offers)


def _classify(mk: _Market, L: np.ndarray, U: np.ndarray, within: _Box | None = None) -> _Box:
    """Settle every agent whose best choice is the same at all prices in [L, U]. Given ``within`` (a box
    holding this one), only the agents it left near are looked at again."""
    if within is None:
        bids, offers = slice(None), slice(None)  # views: the first pass is over the whole round
        bid_state, offer_state = np.empty(len(mk.b), dtype=np.int8), np.empty(len(mk.c), dtype=np.int64)
        settled = np.zeros(mk.K)
    else:
        bids, offers = np.flatnonzero(within.bid == -1), np.flatnonzero(within.offer == -2)
        bid_state, offer_state, settled = within.bid.copy(), within.offer.copy(), within.settled.copy()
    cls, b, q = mk.cls[bids], mk.b[bids], mk.q[bids]
    above, below = b > U[cls], b < L[cls]
    state = 2 * above.astype(np.int8) + below - 1  # 1: served in full, 0: not served, -1: near
    bid_state[bids] = state
    settled -= np.bincount(cls[above], q[above], mk.K)
    Q, c = mk.Q[offers], mk.c[offers]
    # An offer's profit over the interval in market k runs from Q_k (L_k - c) to Q_k (U_k - c) across the box.
    # It is settled on market k if its least profit there is positive and beats the most it could make in any
    # other market; idle if no market it serves reaches its reserve.
    sure, k = np.zeros(len(c)), np.zeros(len(c), dtype=np.int64)
    for market in range(mk.K):
        least = Q[:, market] * (L[market] - c)
        better = least > sure
        sure = np.where(better, least, sure)
        k[better] = market
    rivals = np.zeros(len(c), dtype=np.int8)
    awake = np.zeros(len(c), dtype=bool)
    for market in range(mk.K):
        rivals += Q[:, market] * (U[market] - c) >= sure
        awake |= (Q[:, market] > 0) & (U[market] >= c)
    state = np.where((sure > 0) & (rivals == 1), k, np.where(awake, -2, -1))
    offer_state[offers] = state
    sells = np.flatnonzero(state >= 0)
    settled += np.bincount(state[sells], Q[sells, state[sells]], mk.K)
    return _Box(L, U, bid_state, offer_state, settled)


@dataclass(frozen=True)
class _Margin:
    """The agents a box left near, with the LP's shares: ``phi`` per near bid (of its quantity), ``F`` per
    near offer and market (of its interval); ``candidate`` marks the markets each near offer may be best in
    somewhere in the box; ``left_out`` the near offers (positions in ``offers``) the LP did not get, which
    stay idle; ``prices`` the LP's dual prices. ``buyer`` / ``seller``: per market, whether the box's floor
    buyer or ceiling seller traded (the box did not hold the optimum)."""

    bids: np.ndarray
    offers: np.ndarray
    phi: np.ndarray
    F: np.ndarray
    candidate: np.ndarray
    left_out: np.ndarray
    prices: np.ndarray
    buyer: np.ndarray
    seller: np.ndarray


def _residual_lp(mk: _Market, box: _Box, wanted: np.ndarray) -> _Margin:
    """The LP of the agents the box left near, with the settled ones as constants and, per market, a buyer
    at the box's floor and a seller at its ceiling (so its dual is the round's dual minimised over the box).

    Agents that are alike are one column, so that ties in the data (many jobs at one price, many cars at one
    reserve) cost nothing: bids of a market at one price; and offers that can be best in only one market
    within the box, by market and reserve (each sells up to its capacity there at its reserve). Markets an
    offer cannot be best in anywhere in the box are left out of its columns. Alike agents get equal shares;
    the allocation later serves them in id order.

    Offers that may be best in several markets each need a row. When a price lands on a reserve that very many
    such cars share, only the first ``_MARGIN_OFFERS`` of them by id, and those in ``wanted`` (offer indices),
    go to the LP; the caller adds those that would profit at its prices and solves again (column
    generation)."""
    K = mk.K
    near_bids = np.flatnonzero(box.bid == -1)
    near_offers = np.flatnonzero(box.offer == -2)
    c, Q = mk.c[near_offers], mk.Q[near_offers]
    sure = np.maximum((Q * (box.L - c[:, None])).max(1, initial=0.0), 0.0)
    candidate = (Q > 0) & (Q * (box.U - c[:, None]) >= sure[:, None])
    pooled = candidate.sum(1) == 1
    bid_keys, bid_group = np.unique(np.stack([mk.cls[near_bids], mk.b[near_bids]], 1), axis=0, return_inverse=True)
    bid_quantity = np.bincount(bid_group, mk.q[near_bids], len(bid_keys))
    pool_market = candidate[pooled].argmax(1)
    pool_keys, pool_group = np.unique(np.stack([pool_market, c[pooled]], 1), axis=0, return_inverse=True)
    pool_capacity = np.bincount(pool_group, Q[pooled, pool_market], len(pool_keys))
    single = np.flatnonzero(~pooled)
    given = np.zeros(len(single), dtype=bool)
    given[:_MARGIN_OFFERS] = True
    given |= np.isin(near_offers[single], wanted)
    single, left_out = single[given], single[~given]
    pair_offer, pair_k = np.nonzero(candidate[single])
    pair_q = Q[single[pair_offer], pair_k]
    # Columns: bid groups, pooled offer groups, (offer, market) pairs, then per market the floor buyer and the
    # ceiling seller (in mega-ops). Rows: one balance per market, then one interval per unpooled offer.
    demand = (bid_keys[:, 0].astype(np.int64), bid_quantity, bid_keys[:, 1] * bid_quantity)
    supply = (pool_keys[:, 0].astype(np.int64), -pool_capacity, -pool_keys[:, 1] * pool_capacity)
    nb, npool, npair = len(bid_quantity), len(pool_capacity), len(pair_k)
    row_scale = np.ones(K)  # each market's row in units of its largest entry; the box traders count in them
    for rows, values in ((demand[0], demand[1]), (supply[0], -supply[1]), (pair_k, pair_q)):
        np.maximum.at(row_scale, rows, values)
    pair_start = nb + npool + 2 * np.arange(npair)
    start = np.concatenate([np.arange(nb + npool), pair_start, nb + npool + 2 * npair + np.arange(2 * K + 1)])
    index = np.concatenate([demand[0], supply[0], np.stack([pair_k, K + pair_offer], 1).ravel(), np.arange(K),
                            np.arange(K)])
    value = np.concatenate([demand[1] / row_scale[demand[0]], supply[1] / row_scale[supply[0]],
                            np.stack([-pair_q / row_scale[pair_k], np.ones(npair)], 1).ravel(),
                            np.ones(K), -np.ones(K)])
    cost = np.concatenate([demand[2], supply[2], -c[single[pair_offer]] * pair_q, box.L * row_scale,
                           -box.U * row_scale])
    rhs = box.settled / row_scale
    cost_scale = max(1.0, np.abs(cost).max())
    x, row_dual = _lp(cost / cost_scale, np.zeros(len(cost)),
                      np.concatenate([np.ones(nb + npool + npair), np.full(2 * K, np.inf)]),
                      np.concatenate([rhs, np.full(len(single), -np.inf)]), np.concatenate([rhs, np.ones(len(single))]),
                      start, index, value, maximize=True, duals=True)
    F = np.zeros((len(near_offers), K))
    pooled_at = np.flatnonzero(pooled)
    F[pooled_at, pool_market] = _snap(x[nb:nb + npool])[pool_group]
    F[single[pair_offer], pair_k] = _snap(x[nb + npool:nb + npool + npair])
    artificial = x[nb + npool + npair:]
    return _Margin(bids=near_bids, offers=near_offers, phi=_snap(x[:nb])[bid_group], F=F, candidate=candidate,
                   left_out=left_out, prices=row_dual[:K] * cost_scale / row_scale,
                   buyer=artificial[:K] > _TOL, seller=artificial[K:] > _TOL)


def _snap(share: np.ndarray) -> np.ndarray:
    """Shares within the tolerance of 0 or 1 are 0 or 1 (the LP's arithmetic leaves dust)."""
    return np.where(share < _TOL, 0.0, np.where(share > 1 - _TOL, 1.0, share))


def _dual_extremes(mk: _Market, box: _Box, margin: _Margin, lo: float, hi: float):
    """The least and greatest dual optima in the box, clipped to the round's price range: the prices at
    which the LP's allocation is every agent's own best choice (complementary slackness). The settled agents
    add nothing: their choice is strictly best everywhere in the box; nor do markets an offer cannot be best
    in anywhere in it."""
    lower, upper = np.maximum(box.L, lo), np.minimum(box.U, hi)
    phi, F = margin.phi, margin.F
    cls, b = mk.cls[margin.bids], mk.b[margin.bids]
    np.minimum.at(upper, cls[phi > 0], b[phi > 0])  # a bid that buys pays at most its price
    np.maximum.at(lower, cls[phi < 1], b[phi < 1])  # a bid left wanting would not pay the price
    c, Q = mk.c[margin.offers], mk.Q[margin.offers]
    resting, k = np.nonzero(((F.sum(1) < 1 - _TOL)[:, None]) & margin.candidate)
    np.minimum.at(upper, k, c[resting])  # an offer with time left (or left out) would earn nothing anywhere
    seller, k = np.nonzero(F > 0)
    np.maximum.at(lower, k, c[seller])  # an offer that sells earns at least its reserve ...
    # ... and no less than in any other market it may be best in: Q_l (p_l - c) <= Q_k (p_k - c).
    K = mk.K
    r, k, l = np.repeat(seller, K), np.repeat(k, K), np.tile(np.arange(K), len(seller))
    other = margin.candidate[r, l] & (l != k)
    r, k, l = r[other], k[other], l[other]
    scale = np.maximum(Q[r, l], Q[r, k])
    gap = lower - upper
    if np.any(gap > _TOL * np.maximum(1.0, np.abs(upper))):
        raise ArithmeticError(f"inconsistent dual bounds {lower} > {upper}")
    upper = np.maximum(upper, lower)
    if not len(r):
        return lower, upper
    # Prices normalised to the round's range, so the LP's tolerances are relative ones.
    span = max(hi - lo, 1.0)
    start = 2 * np.arange(len(r) + 1)
    index = np.stack([l, k], 1).ravel()
    value = np.stack([Q[r, l] / scale, -Q[r, k] / scale], 1).ravel()
    row_upper = (Q[r, l] - Q[r, k]) / scale * (c[r] - lo) / span
    extremes = []
    for sense in (False, True):
        p = _lp(np.ones(K), (lower - lo) / span, (upper - lo) / span, np.full(len(r), -np.inf), row_upper,
                start, index, value, maximize=sense, rowwise=True)
        extremes.append(np.clip(lo + p * span, lower, upper))
    return extremes[0], np.maximum(extremes[1], extremes[0])


def _allocate(mk: _Market, box: _Box, p: np.ndarray, margin: _Margin):
    """Every agent's trade at the clearing prices p: its own best choice where that is unique, the LP's
    where it is indifferent. Among bids at a market's price, and among offers whose reserve equals it (and
    that have no better market), the lower id goes first; each market then balances on those two groups."""
    K = mk.K
    near_bids, near_offers, phi, F = margin.bids, margin.offers, margin.phi, margin.F
    y = np.where(box.bid == 1, mk.q, 0.0)
    X = np.zeros_like(mk.Q)
    selling = np.flatnonzero(box.offer >= 0)
    X[selling, box.offer[selling]] = mk.Q[selling, box.offer[selling]]
    cls, b, q = mk.cls[near_bids], mk.b[near_bids], mk.q[near_bids]
    price = p[cls]
    at_price = np.abs(b - price) <= _TOL * np.maximum(1.0, np.abs(price))
    y[near_bids] = np.where(at_price, phi * q, np.where(b > price, q, 0.0))
    c, Q = mk.c[near_offers], mk.Q[near_offers]
    profit = np.where(Q > 0, Q * (p - c[:, None]), -np.inf)
    top = np.maximum(profit.max(1), 0.0)
    tol = _TOL * Q.max(1) * np.maximum(1.0, np.maximum(np.abs(p).max(), np.abs(c)))
    idle = top <= tol
    choices = (profit >= (top - tol)[:, None]).sum(1) + idle
    best = profit.argmax(1)
    sold = F * Q  # the LP's split where the offer is indifferent
    sure = np.flatnonzero(choices == 1)
    sold[sure] = 0.0
    sells = sure[~idle[sure]]
    sold[sells, best[sells]] = Q[sells, best[sells]]
    X[near_offers] = sold
    bid_pool = near_bids[at_price]
    at_reserve = (choices == 2) & idle
    offer_pool, pool_market = near_offers[at_reserve], best[at_reserve]
    gap = box.settled + sold.sum(0) - np.bincount(cls, y[near_bids], K)  # supply minus demand
    for k in range(K):
        bids, offers = bid_pool[mk.cls[bid_pool] == k], offer_pool[pool_market == k]
        if len(bids):
            before = y[bids].sum()
            y[bids] = _in_id_order(before + gap[k], mk.q[bids])
            gap[k] -= y[bids].sum() - before
        if len(offers):
            X[offers, k] = _in_id_order(X[offers, k].sum() - gap[k], mk.Q[offers, k])
    return y, X


def _in_id_order(total: float, caps: np.ndarray) -> np.ndarray:
    """``total`` shared out in id order, each taking up to its cap."""
    before = np.cumsum(caps) - caps
    return np.clip(total - before, 0.0, caps)


_DUST = 1e-6  # mega-ops: a fill below this is arithmetic noise


def _pair(mk: _Market, y: np.ndarray, X: np.ndarray):
    """Fills: in each market, buyers and sellers in id order, walked side by side."""
    bids, offers, quantities = [], [], []
    for k in range(mk.K):
        j = np.flatnonzero((mk.cls == k) & (y > 0))
        i = np.flatnonzero(X[:, k] > 0)
        if not len(j) or not len(i):
            continue
        demand, supply = np.cumsum(y[j]), np.cumsum(X[i, k])
        total = min(demand[-1], supply[-1])
        # Merge the two runs of running totals: each cut ends a fill; the bid (offer) of a fill is the count
        # of bids' (offers') totals passed before it.
        ends = np.concatenate([demand, supply])
        order = np.argsort(ends, kind="stable")
        cuts = ends[order]
        bid_at = np.cumsum(order < len(demand)) - (order < len(demand))
        offer_at = np.cumsum(order >= len(demand)) - (order >= len(demand))
        length = np.diff(np.minimum(cuts, total), prepend=0.0)
        keep = length > _DUST
        bids.append(j[bid_at[keep]])
        offers.append(i[offer_at[keep]])
        quantities.append(length[keep])
    if not bids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(bids), np.concatenate(offers), np.concatenate(quantities)


# --- refusals ------------------------------------------------------------------------------------------


def _route_consenting(mk: _Market, y: np.ndarray, X: np.ndarray, banned: set[tuple[int, int]]):
    """The fills of the refusal-free clearing, paired in id order but skipping refused pairs; None when
    some bid cannot be served that way."""
    bids, offers, quantities = [], [], []
    for k in range(mk.K):
        j = np.flatnonzero((mk.cls == k) & (y > 0)).tolist()
        i = np.flatnonzero(X[:, k] > 0).tolist()
        left = X[i, k].tolist()
        first = 0  # offers before it are sold out
        for bid in j:
            wanted = y[bid]
            for r in range(first, len(i)):
                if left[r] <= _DUST:
                    if r == first:
                        first += 1
                    continue
                if (bid, i[r]) in banned:
                    continue
                take = min(wanted, left[r])
                bids.append(bid), offers.append(i[r]), quantities.append(take)
                left[r] -= take
                wanted -= take
                if wanted <= _DUST:
                    break
            if wanted > _DUST:
                return None
    return np.array(bids, dtype=np.int64), np.array(offers, dtype=np.int64), np.array(quantities)


def _clear_consenting(mk: _Market, banned: set[tuple[int, int]], free: _Solution):
    """The surplus-maximising allocation over consenting pairs (an LP over (bid, offer) pairs) with one
    voluntary price per market. Where that allocation leaves a market no such price (a cheap offer that
    refuses the dearest bid serves a lower one while a dear offer serves the dearest), the market gets a
    threshold: only its bids at or above it and its offers at or below it trade. Of the thresholds at its
    agents' prices, the one with the most surplus wins (the lowest on a tie); markets are fixed one at a time,
    and a market with a threshold cannot cross again. Where the result is as good as the refusal-free
    optimum, the refusal-free prices stand; otherwise a market's price is the midpoint of [dearest reserve
    that sold, lowest bid that bought]."""
    n, K = len(mk.b), mk.K
    consent = (mk.Q[:, mk.cls].T > 0) & (mk.b[:, None] >= mk.c[None, :])
    refused = np.array(sorted(banned))
    consent[refused[:, 0], refused[:, 1]] = False
    thresholds = np.full(K, np.nan)

    def solve(thresholds):
        allowed = consent.copy()
        for k in np.flatnonzero(~np.isnan(thresholds)):
            market = mk.cls == k
            allowed[market & (mk.b < thresholds[k])] = False
            allowed[np.ix_(market, mk.c > thresholds[k])] = False
        J, I = np.nonzero(allowed)
        gain = (mk.b[J] - mk.c[I]) * mk.q[J]
        value = np.stack([np.ones(len(J)), mk.q[J] / mk.Q[I, mk.cls[J]]], 1).ravel()  # bid row, offer's interval
        share = _lp(gain / max(1.0, np.abs(gain).max(initial=0.0)), np.zeros(len(J)), np.ones(len(J)),
                    np.full(n + len(mk.c), -np.inf), np.ones(n + len(mk.c)), 2 * np.arange(len(J) + 1),
                    np.stack([J, n + I], 1).ravel(), value, maximize=True)
        traded = share * mk.q[J]
        keep = traded > _DUST
        return J[keep], I[keep], traded[keep]

    def value(fills):
        J, I, traded = fills
        return ((mk.b[J] - mk.c[I]) * traded).sum()

    for _ in range(K + 1):
        fills = solve(thresholds)
        J, I, _ = fills
        dearest, cheapest = np.full(K, -np.inf), np.full(K, np.inf)
        np.maximum.at(dearest, mk.cls[J], mk.c[I])
        np.minimum.at(cheapest, mk.cls[J], mk.b[J])
        crossed = np.flatnonzero(dearest > cheapest)
        if not len(crossed):
            break
        k = crossed[0]
        prices = np.unique(np.concatenate([mk.b[mk.cls == k], mk.c[mk.Q[:, k] > 0]]))
        best = None
        for threshold in prices[(prices >= cheapest[k]) & (prices <= dearest[k])]:
            trial = thresholds.copy()
            trial[k] = threshold
            candidate = value(solve(trial))
            if best is None or candidate > best[0]:
                best = (candidate, threshold)
        thresholds[k] = best[1]
    free_surplus = (mk.b * free.y).sum() - (mk.c[:, None] * free.X).sum()
    if value(fills) >= free_surplus * (1 - _TOL) - _TOL:
        return fills, free.p
    traded = np.isfinite(dearest)
    return fills, np.where(traded, (np.where(traded, dearest, 0) + np.where(traded, cheapest, 0)) / 2, free.p)


# --- the estimate ---------------------------------------------------------------------------------------


class _Smoothed:
    """The dual with each bid's q (b - p)^+ smoothed to a softplus and each offer's
    max(0, max_k Q_k (p_k - c)) to a log-sum-exp at temperature tau, over some agents plus a linear term for
    agents already settled. Prices normalised to the round's range, quantities to its typical size."""

    def __init__(self, cls, b, q, c, Q, linear):
        self.cls, self.b, self.q, self.c, self.Q, self.linear = cls, b, q, c, Q, linear
        self.K = len(linear)
        self.serves = Q > 0
        self.top = np.where(self.serves.any(1), Q.max(1), 1.0)

    def shares(self, p, tau):
        """Each bid's smoothed served share, and each offer's smoothed shares of its interval per market,
        with the terms of the smoothed dual."""
        z = (self.b - p[self.cls]) / tau
        served = 0.5 * (1 + np.tanh(z / 2))
        value = tau * (self.q * np.logaddexp(0, z)).sum() + self.linear @ p
        z = self.Q * (p - self.c[:, None]) / (tau * self.top[:, None])  # 0 where not served, masked below
        zmax = np.maximum(z.max(1), 0.0)
        e = np.exp(z - zmax[:, None]) * self.serves
        total = np.exp(-zmax) + e.sum(1)
        value += tau * (self.top * (zmax + np.log(total))).sum()
        return served, e / total[:, None], value

    def dual(self, p, tau):
        """Value, gradient (the smoothed excess supply) and Hessian at p."""
        served, share, f = self.shares(p, tau)
        K = self.K
        g = self.linear - np.bincount(self.cls, self.q * served, K)
        curvature = np.bincount(self.cls, self.q * served * (1 - served), K) / tau
        sold = self.Q * share
        g += sold.sum(0)
        weight = (1 / (tau * self.top))[:, None]
        H = np.diag(curvature + (self.Q * sold * weight).sum(0)) - (sold * weight).T @ sold
        return f, g, H

    def spread(self, p, tau):
        """The covariance of the agents' contributions to the excess supply, summed: the sampling variance
        of the gradient when these agents stand for a population."""
        served, share, _ = self.shares(p, tau)
        bids = np.zeros((len(self.b), self.K))
        bids[np.arange(len(self.b)), self.cls] = -self.q * served
        offers = self.Q * share
        return sum(len(a) * np.cov(a, rowvar=False, bias=True).reshape(self.K, self.K)
                   for a in (bids, offers) if len(a))


def _newton(dual: _Smoothed, p: np.ndarray, taus) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise the smoothed dual at each temperature in turn (Newton's method with backtracking). Returns
    the prices, the last step and the Hessian there."""
    K = len(p)
    step = np.zeros(K)
    H = np.eye(K)
    for tau in taus:
        f, g, H = dual.dual(p, tau)
        for _ in range(12):
            d = np.clip(np.linalg.solve(H + (1e-9 * np.trace(H) / K + 1e-300) * np.eye(K), -g), -0.25, 0.25)
            t = 1.0
            while True:
                f_new, g_new, H_new = dual.dual(p + t * d, tau)
                if f_new <= f + 1e-4 * t * (g @ d) or t < 1e-3:
                    break
                t /= 2
            step = t * d
            p, f, g, H = p + step, f_new, g_new, H_new
            if np.abs(step).max() < tau / 20:
                break
    return p, step, H


def _fine(mk: _Market) -> float:
    """The finest smoothing worth using (normalised prices): a few times the spacing of agents' prices."""
    return float(np.clip(3 * mk.K / max(len(mk.b), len(mk.c)), 2e-6, 0.02))


def _estimate(mk: _Market, lo: float, hi: float, floor: np.ndarray, ceil: np.ndarray) -> _Box:
    """A box that very likely holds the clearing prices, with every agent classified over it.

    The smoothed dual is minimised while cooling: first on every s-th bid and offer of the round (weighted to
    stand for the rest), then, at each cooler temperature, on a subsample of the agents the current box left
    near (the settled ones a constant). Each estimate shrinks the box to a few of its standard errors (from
    the subsample's spread), the smoothing's bias and its last Newton step, and only the agents inside it
    are classified again. Everything here only saves work: the LP's box test corrects a wrong guess."""
    K = mk.K
    span = max(hi - lo, 1.0)
    scale = max(1.0, mk.q.mean())  # quantities of order one; Newton does not care otherwise
    p = np.full(K, 0.5)
    box = None
    taus = [0.1, 0.03, 0.01, 0.003]
    while taus[-1] > _fine(mk):
        taus.append(max(taus[-1] / 5, _fine(mk)))
    for level, tau in enumerate(taus):
        if box is None:
            bs, os = max(1, len(mk.b) // _SAMPLE), max(1, len(mk.c) // _SAMPLE)
            bids, offers = slice(None, None, bs), slice(None, None, os)
        else:
            bids, offers = np.flatnonzero(box.bid == -1), np.flatnonzero(box.offer == -2)
            if not len(bids) and not len(offers):
                break  # everyone is settled: nothing left to estimate with
            bs, os = max(1, len(bids) // _SAMPLE), max(1, len(offers) // _SAMPLE)
            bids, offers = bids[::bs], offers[::os]
        linear = np.zeros(K) if box is None else box.settled / scale
        dual = _Smoothed(mk.cls[bids], (mk.b[bids] - lo) / span, mk.q[bids] * bs / scale,
                         (mk.c[offers] - lo) / span, mk.Q[offers] * os / scale, linear)
        p, step, H = _newton(dual, p, [tau])
        p = np.clip(p, 0.0, 1.0)  # every optimum has prices within the round's range
        if tau > 0.005:
            continue  # too warm to settle anyone yet
        half = 4 * tau + 3 * np.abs(step)  # smoothing moves the optimum by a few tau (more near an atom)
        if bs > 1 or os > 1:
            inverse = np.linalg.inv(H + 1e-9 * np.trace(H) / K * np.eye(K))
            half += 3 * np.sqrt(np.abs(np.diag(inverse @ dual.spread(p, tau) @ inverse)))
        L, U = np.maximum(lo + (p - half) * span, floor), np.minimum(lo + (p + half) * span, ceil)
        if box is not None and np.all(L >= box.L) and np.all(U <= box.U):
            box = _classify(mk, L, U, within=box)
        elif box is not None and np.all(L <= box.U) and np.all(U >= box.L):
            box = _classify(mk, np.maximum(L, box.L), np.minimum(U, box.U), within=box)
        else:  # the estimate left the box it came from: that box was wrong, start again around the estimate
            box = _classify(mk, L, U)
    return box


# --- linear programmes (HiGHS) ---------------------------------------------------------------------------


def _lp(cost, lower, upper, row_lower, row_upper, start, index, value, *, maximize: bool, rowwise: bool = False,
        duals: bool = False):
    """Solve an LP with HiGHS (simplex, so the solution is a vertex). Returns the column values (and, with
    ``duals``, the row duals: for a maximisation, d objective / d row bound)."""
    if not len(cost):
        return (np.zeros(0), np.zeros(len(row_lower))) if duals else np.zeros(0)
    lp = highs.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), len(row_lower)
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = (np.asarray(a, dtype=float) for a in (cost, lower, upper))
    lp.row_lower_, lp.row_upper_ = np.asarray(row_lower, dtype=float), np.asarray(row_upper, dtype=float)
    lp.a_matrix_.format_ = highs.MatrixFormat.kRowwise if rowwise else highs.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.asarray(start, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=float)
    lp.sense_ = highs.ObjSense.kMaximize if maximize else highs.ObjSense.kMinimize
    solver = highs._Highs()
    solver.setOptionValue("output_flag", False)
    solver.setOptionValue("threads", 1)
    solver.setOptionValue("primal_feasibility_tolerance", 1e-10)
    solver.setOptionValue("dual_feasibility_tolerance", 1e-10)
    solver.passModel(lp)
    solver.run()
    status = solver.getModelStatus()
    if status != highs.HighsModelStatus.kOptimal:
        raise ArithmeticError(f"HiGHS: {solver.modelStatusToString(status)}")
    solution = solver.getSolution()
    if duals:
        return np.asarray(solution.col_value), np.asarray(solution.row_dual)
    return np.asarray(solution.col_value)


def lp_reference(book: Book, *, refused: np.ndarray | None = None) -> float:
    """The optimal surplus of a book by one plain LP (HiGHS), for tests and benchmarks to hold the clearing
    to. Without refusals the LP has a share per bid and per (offer, market); with them, a share per
    consenting (bid, offer) pair."""
    n, K = len(book.bid_id), len(book.markets)
    b, q, c = book.bid_price.astype(float), book.bid_quantity.astype(float), book.offer_price.astype(float)
    Q = np.where(book.offer_capacity > 0, book.offer_capacity, 0.0).astype(float)
    if refused is None or not len(refused):
        offer, market = np.nonzero(Q)
        cost = np.concatenate([b * q, -c[offer] * Q[offer, market]])
        start = np.concatenate([np.arange(n), n + 2 * np.arange(len(offer) + 1)])
        index = np.concatenate([book.bid_market, np.stack([market, K + offer], 1).ravel()])
        value = np.concatenate([q, np.stack([-Q[offer, market], np.ones(len(offer))], 1).ravel()])
        row_lower = np.concatenate([np.zeros(K), np.full(len(c), -np.inf)])
        row_upper = np.concatenate([np.zeros(K), np.ones(len(c))])
    else:
        ok = Q[:, book.bid_market].T > 0
        ok[refused[:, 0], refused[:, 1]] = False
        J, I = np.nonzero(ok)
        cost = (b[J] - c[I]) * q[J]
        start = 2 * np.arange(len(J) + 1)
        index = np.stack([J, n + I], 1).ravel()
        value = np.stack([np.ones(len(J)), q[J] / Q[I, book.bid_market[J]]], 1).ravel()
        row_lower, row_upper = np.full(n + len(c), -np.inf), np.ones(n + len(c))
    scale = max(1.0, np.abs(cost).max()) if len(cost) else 1.0
    x = _lp(cost / scale, np.zeros(len(cost)), np.ones(len(cost)), row_lower, row_upper, start, index, value,
            maximize=True)
    return float(cost @ x)
