"""The orchestration layer: the only code that calls more than one app's services.

A job's life crosses all three apps: its row and history are the market's, its units and leases the fleet's,
its reservation, meter records and ledger billing's. Each app's services write only that app's rows; the
flows here call them in one transaction per step and take the rows' locks in the one order that
docs/concurrency.md writes down, through :mod:`marketplace.flows.locks`. Views, API views, the gateway,
tasks and management commands call these functions (and an app's own services for what stays in one app).
"""

from marketplace.flows.batches import batch_cancel, batch_create, batch_finalize, batches_finalize
from marketplace.flows.jobs import (
                                    UNCHANGED,
                                    auction_tick,
                                    job_bid_update,
                                    job_budget_update,
                                    job_cancel,
                                    job_close,
                                    job_create,
                                    job_create_from,
                                    job_terms_update,
                                    jobs_expire,
)
from marketplace.flows.retention import job_data_delete, jobs_data_expire
from marketplace.flows.units import (
    unit_arbitrate,
    unit_complete,
    units_lease,
    units_reference,
    units_verify_sweep,
    vehicle_caught,
)

__all__ = ["UNCHANGED", "batch_cancel", "batch_create", "batch_finalize", "batches_finalize", "auction_tick", "job_bid_update", "job_budget_update", "job_cancel", "job_close", "job_create",
           "job_create_from", "job_data_delete", "jobs_data_expire", "job_terms_update", "jobs_expire", "unit_arbitrate", "unit_complete", "units_lease",
           "units_reference", "units_verify_sweep", "vehicle_caught"]
