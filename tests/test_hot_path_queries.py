"""The hot paths' database round trips are pinned: leasing a batch, completing a unit and the auction tick. A
change that adds a query on them fails here; lower the pin when a change removes one. BEGIN, COMMIT and
savepoints count, and the counts are the same on SQLite and PostgreSQL."""

import base64

import numpy as np
import pytest

from fleet.models import WorkUnit
from marketplace import flows
from tests.factories import VehicleFactory

pytestmark = pytest.mark.django_db(transaction=True)  # the flows' own transactions, as in production

# Round trips in the steady state: a job already running, its car's ledger accounts already open, and a
# completion that draws no new cent from the reservation (one more INSERT, of the ledger entries, when it does).
PINNED = {
    # the expiry and release sweeps, the open jobs with their queued work and budgets, the cars on offer, the round;
    # capacity is proven (docs/vehicle-protocol.md, "Capacity is measured"): +1 the cars' delivered rates (one
    # prefetch for all of them), +1 their standing (the share of their recent allocations they used; one query)
    "auction_tick": 15,
    # the car's row, hardware, throughputs and block list, its held count, its allocations, the claim, the
    # leases, the allocation drawn; +1 its delivered rates (prefetched with its row: batches are sized to them),
    # +1 the allocation's remainder read again under its row lock (other cars may draw on what a car leaves unused)
    "units_lease": 12,
    # the locks (reservation, job, unit), the car, the lease and the unit, the fee, the ledger accounts, the
    # carries, the reservation, the ledger transaction, the meter record, the job, the buyer's webhook endpoints;
    # +1 the car's delivered rate (unit_result_accept meters energy at vehicle_mops_per_s, which reads it),
    # +1 the rate row updated with this result (fleet.services.vehicle_rate_record); results are judged
    # (docs/verification.md): +1 the lease read before it is settled with its verdict, +3 the car's standing (its
    # streak) in a transaction of its own after the unit's, since the car's row comes before units in the lock order
    "unit_complete": 30,
}


def result_for(unit: WorkUnit) -> list[str]:
    """A well-formed result for ``unit``: one unit vector per document."""
    vector = np.zeros(384, dtype="<f4")
    vector[0] = 1.0
    return [base64.b64encode(vector.tobytes()).decode()] * len(unit.inputs)


def complete_one(make_job, docs: int = 64) -> WorkUnit:
    """A job whose first unit a car computed (through the flows), at a price above zero."""
    make_job(docs=docs)
    car = VehicleFactory(policy__reserve_price_micros=1_000_000)
    flows.auction_tick()
    (unit, *_), _ = flows.units_lease(vehicle_id=car.pk)
    assert flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                               result=result_for(unit)) == (True, "")
    return unit


def test_the_hot_paths_make_the_pinned_number_of_round_trips(make_job, django_assert_num_queries):
    first = complete_one(make_job, docs=1024)  # the job is running, with work left, and every ledger account exists
    car_id = WorkUnit.objects.get(pk=first.pk).completed_by_id
    with django_assert_num_queries(PINNED["auction_tick"]):
        flows.auction_tick()
    with django_assert_num_queries(PINNED["units_lease"]):
        units, reason = flows.units_lease(vehicle_id=car_id)
    assert units, reason
    unit = units[0]
    with django_assert_num_queries(PINNED["unit_complete"]):
        accepted, reason = flows.unit_complete(vehicle_id=car_id, unit_id=unit.pk, epoch=unit.lease_epoch,
                                               result=result_for(unit))
    assert accepted, reason
