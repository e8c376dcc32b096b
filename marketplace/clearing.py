"""Sealed-bid uniform-price double auction for one market and one round. Pure Python, no ORM.

Bids (jobs) are sorted by price descending, offers (cars) by price ascending; ties break by id, so the
outcome is a deterministic function of the inputs. Quantities are mega-ops. Matching walks both lists while
the best remaining bid is at least the cheapest remaining offer. The single clearing price lies in the
interval that keeps every trade voluntary and no unmatched pair willing to trade:

    low  = max(price of the last matched offer, highest bid left with unmet quantity)
    high = min(price of the last matched bid,   cheapest offer left with unsold capacity)

and is the midpoint of [low, high], rounded down. So winners never pay above their bid and sellers never
receive below their reserve. See docs/auction.md.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Bid:
    id: int
    price: int  # micro-units per compute unit
    quantity: int  # mega-ops wanted


@dataclass(frozen=True)
class Offer:
    id: int
    price: int  # reserve, micro-units per compute unit
    quantity: int  # mega-ops offered


@dataclass(frozen=True)
class Fill:
    bid_id: int
    offer_id: int
    quantity: int


@dataclass(frozen=True)
class Outcome:
    price: int | None
    fills: tuple[Fill, ...]

    @property
    def volume(self) -> int:
        return sum(f.quantity for f in self.fills)


def clear(bids: list[Bid], offers: list[Offer], compatible=None) -> Outcome:
    """Clear one market. ``compatible(bid_id, offer_id)``, if given, says which pairs may trade (an owner's
    consent); see :func:`_clear_compatible`."""
    return _clear(bids, offers) if compatible is None else _clear_compatible(bids, offers, compatible)


def _clear_compatible(bids, offers, compatible) -> Outcome:
    """Greedy matching under compatibility: bids by price descending take the cheapest compatible capacity
    whose price is at most their own, as long as one uniform price can still serve every trade made (the
    dearest offer used stays at or below every winning bid). The price is the midpoint of
    [dearest offer used, lowest winning bid]. Not the surplus-maximising allocation (issue 5's LP is)."""
    bids = sorted((b for b in bids if b.quantity > 0), key=lambda b: (-b.price, b.id))
    offers = sorted((o for o in offers if o.quantity > 0), key=lambda o: (o.price, o.id))
    left = {o.id: o.quantity for o in offers}
    fills: list[Fill] = []
    dearest_offer, lowest_bid = None, None
    for bid in bids:
        if dearest_offer is not None and dearest_offer > bid.price:
            break
        wanted = bid.quantity
        for offer in offers:
            if wanted == 0 or offer.price > bid.price:
                break
            if left[offer.id] and compatible(bid.id, offer.id):
                q = min(wanted, left[offer.id])
                fills.append(Fill(bid.id, offer.id, q))
                left[offer.id] -= q
                wanted -= q
                dearest_offer = max(dearest_offer or 0, offer.price)
                lowest_bid = bid.price
    if not fills:
        return Outcome(price=None, fills=())
    return Outcome(price=(dearest_offer + lowest_bid) // 2, fills=tuple(fills))


def _clear(bids: list[Bid], offers: list[Offer]) -> Outcome:
    """The clearing of one market where every pair may trade (module docstring)."""
    bids = sorted((b for b in bids if b.quantity > 0), key=lambda b: (-b.price, b.id))
    offers = sorted((o for o in offers if o.quantity > 0), key=lambda o: (o.price, o.id))
    fills: list[Fill] = []
    bid_left = [b.quantity for b in bids]
    offer_left = [o.quantity for o in offers]
    i = j = 0
    while i < len(bids) and j < len(offers) and bids[i].price >= offers[j].price:
        q = min(bid_left[i], offer_left[j])
        fills.append(Fill(bids[i].id, offers[j].id, q))
        bid_left[i] -= q
        offer_left[j] -= q
        last_bid, last_offer = bids[i].price, offers[j].price
        if bid_left[i] == 0:
            i += 1
        if offer_left[j] == 0:
            j += 1
    if not fills:
        return Outcome(price=None, fills=())
    unmet_bid = next((b.price for b, left in zip(bids, bid_left) if left > 0), None)
    unsold_offer = next((o.price for o, left in zip(offers, offer_left) if left > 0), None)
    low = max(last_offer, unmet_bid if unmet_bid is not None else last_offer)
    high = min(last_bid, unsold_offer if unsold_offer is not None else last_bid)
    return Outcome(price=(low + high) // 2, fills=tuple(fills))
