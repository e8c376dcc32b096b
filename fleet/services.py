"""Everything in the fleet that writes: vehicles and pairing, live state, leases and results."""

import logging
import math
import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, FloatField, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce, Exp, Greatest, Least
from django.utils import timezone

from fleet import dispatch, tokens, verification, workloads
from fleet.agent import workloads as agent_workloads
from fleet.agent.models import get_runner
from fleet.eligibility import Window, merge_windows
from fleet.models import HardwareGeneration, Lease, OwnerPolicy, Vehicle, VehicleDailyUsage, VehicleRate, WorkUnit
from fleet.selectors import (
    GatewayView,
    rate_proven,
    vehicle_consents,
    vehicle_data_left_bytes,
    vehicle_gateway_view,
    vehicle_ineligibility,
    vehicle_inflight_limit,
    vehicle_mops_per_s,
    vehicle_outlook,
)
from marketplace.core.errors import ValidationFailed
from marketplace.models import Allocation, AuctionRound, Job

log = logging.getLogger(__name__)

PAIRING_TTL = timedelta(minutes=15)


def vehicle_group(vehicle_id: int) -> str:
    """The channel-layer group of one car's gateway connection."""
    return f"vehicle.{vehicle_id}"


def vehicle_notify(*, vehicle_id: int, message: dict) -> None:
    """Push a control message to the car's connection, wherever it is. Delivery is best effort (the layer
    may drop it when full); the database stays the truth and the heartbeat repairs what is lost."""
    try:
        async_to_sync(get_channel_layer().group_send)(vehicle_group(vehicle_id), message)
    except ChannelFull:
        log.warning("channel full: control message %s to vehicle %s dropped", message.get("type"), vehicle_id)


# --- vehicles, pairing, credentials ------------------------------------------------------------------

@transaction.atomic
def vehicle_create(*, owner, name: str, hardware: HardwareGeneration) -> tuple[Vehicle, str]:
    """Register a car and return it with a one-time pairing code for its agent."""
    vehicle = Vehicle.objects.create(owner=owner, name=name, hardware=hardware)
    OwnerPolicy.objects.create(vehicle=vehicle)
    return vehicle, pairing_code_issue(vehicle=vehicle)


def pairing_code_issue(*, vehicle: Vehicle) -> str:
    code = tokens.new_pairing_code()
    vehicle.pairing_code_hash = tokens.digest(code)
    vehicle.pairing_expires_at = timezone.now() + PAIRING_TTL
    vehicle.save(update_fields=["pairing_code_hash", "pairing_expires_at"])
    return code


def vehicle_pair(*, code: str) -> tuple[Vehicle, str]:
    """Exchange a pairing code for a new device token. The code works once; any older token stops working."""
    normalised = tokens.pairing_code_normalise(code)
    with transaction.atomic():
        vehicle = (Vehicle.objects.select_for_update()
                   .filter(pairing_code_hash=tokens.digest(normalised), removed_at=None).first())
        if vehicle is None or vehicle.pairing_expires_at is None or vehicle.pairing_expires_at < timezone.now():
            raise ValidationFailed("This pairing code is unknown or has expired. Ask the owner's portal for a new one.",
                                   code="pairing_invalid")
        vehicle.pairing_code_hash, vehicle.pairing_expires_at = "", None
        vehicle.save(update_fields=["pairing_code_hash", "pairing_expires_at"])
        token = _token_issue(vehicle=vehicle)
    return vehicle, token


def _token_issue(*, vehicle: Vehicle) -> str:
    """A new device token for the car; any older one stops working and its connection is closed."""
    token, prefix = tokens.new_token("dev")
    had_token = bool(vehicle.token_hash)
    vehicle.token_prefix, vehicle.token_hash = prefix, tokens.digest(token)
    vehicle.token_issued_at, vehicle.token_revoked_at = timezone.now(), None
    vehicle.save(update_fields=["token_prefix", "token_hash", "token_issued_at", "token_revoked_at"])
    if had_token:
        leases_withdraw(vehicle_id=vehicle.pk, reason="token_rotated", notify=False)
        transaction.on_commit(lambda: vehicle_notify(vehicle_id=vehicle.pk, message={"type": "vehicle.revoked"}))
    return token


@transaction.atomic
def vehicle_token_rotate(*, vehicle: Vehicle) -> str:
    """Replace the car's device token (shown once to the owner, who sets it on the car's agent)."""
    return _token_issue(vehicle=Vehicle.objects.select_for_update().get(pk=vehicle.pk))


def device_authenticate(*, token: str) -> Vehicle | None:
    prefix = tokens.prefix_of(token or "", "dev")
    if prefix is None:
        return None
    vehicle = Vehicle.objects.filter(token_prefix=prefix, removed_at=None, token_revoked_at=None).first()
    if vehicle is None or not tokens.matches(token, vehicle.token_hash):
        return None
    return vehicle


def unit_inputs_fetch(*, vehicle: Vehicle, unit_id: int, epoch: int) -> list[str] | None:
    """The inputs of a unit the car holds now (its current lease, that epoch), as the car's runtime takes them
    (docs/vehicle-protocol.md, "Inputs by URL"), counted against the car's daily data; None for any other unit,
    whether it exists or not (a car learns nothing of other cars' work), or once the job's data was deleted."""
    inputs = (WorkUnit.objects.filter(pk=unit_id, lease_epoch=epoch, leased_to=vehicle, state=WorkUnit.State.LEASED)
              .values_list("inputs", flat=True).first())
    if not inputs:
        return None
    texts = [doc["text"] for doc in inputs]
    vehicle_data_record(vehicle_id=vehicle.pk, data_bytes=sum(len(text) for text in texts))
    return texts


def vehicle_token_revoke(*, vehicle: Vehicle) -> None:
    """Revoke the car's device token: its connection is closed and its leases requeued."""
    with transaction.atomic():
        vehicle.token_revoked_at = timezone.now()
        vehicle.save(update_fields=["token_revoked_at"])
        leases_withdraw(vehicle_id=vehicle.pk, reason="token_revoked", notify=False)
        transaction.on_commit(lambda: vehicle_notify(vehicle_id=vehicle.pk, message={"type": "vehicle.revoked"}))


@transaction.atomic
def vehicle_remove(*, vehicle: Vehicle) -> None:
    """Take a car off the marketplace: its token stops working and its work is withdrawn. Its history
    (units, leases, meter records, ledger) stays."""
    Vehicle.objects.filter(pk=vehicle.pk).update(removed_at=timezone.now(), pairing_code_hash="", pairing_expires_at=None)
    vehicle_token_revoke(vehicle=vehicle)


def vehicles_pause_all(*, owner, paused: bool) -> int:
    """Pause (or resume) every car of an owner; returns how many."""
    vehicles = list(Vehicle.objects.filter(owner=owner, removed_at=None).select_related("policy", "hardware"))
    for vehicle in vehicles:
        policy_update(vehicle=vehicle, paused=paused)
    return len(vehicles)


def vehicle_data_record(*, vehicle_id: int, data_bytes: int) -> None:
    """Add network bytes the car exchanged with the gateway to its owner's current day."""
    if data_bytes <= 0:
        return
    tz = OwnerPolicy.objects.filter(vehicle_id=vehicle_id).values_list("timezone", flat=True).first() or "UTC"
    day = timezone.now().astimezone(ZoneInfo(tz)).date()
    with transaction.atomic():
        usage, _ = VehicleDailyUsage.objects.select_for_update().get_or_create(vehicle_id=vehicle_id, day=day)
        VehicleDailyUsage.objects.filter(pk=usage.pk).update(data_bytes=F("data_bytes") + data_bytes)


@transaction.atomic
def policy_update(*, vehicle: Vehicle, blocked_organisations=None, **fields) -> OwnerPolicy:
    """Change the owner's limits (``blocked_organisations``: the full block list, or None to keep it). If the
    car may no longer work, its leases are withdrawn at once; so are leases of jobs it no longer consents to."""
    policy = OwnerPolicy.objects.select_for_update().get(vehicle=vehicle)
    if blocked_organisations is not None:
        policy.blocked_organisations.set(blocked_organisations)
    for name, value in fields.items():
        setattr(policy, name, value)
    if "windows" in fields:  # overlapping windows are merged, so the owner sees what will really apply
        policy.windows = [{"weekday": w.weekday, "start": w.start.strftime("%H:%M"), "end": w.end.strftime("%H:%M")}
                          for w in merge_windows([Window(w["weekday"], time.fromisoformat(w["start"]),
                                                         time.fromisoformat(w["end"])) for w in policy.windows])]
    if policy.battery_resume_pct <= policy.battery_floor_pct:
        raise ValidationFailed("The resume level must be above the stop level, or the car would flip between "
                               "working and stopping.", extra={"fields": {"battery_resume_pct": [
                                   f"Set it above {policy.battery_floor_pct} %."]}})
    policy.save(update_fields=[*fields, "updated_at"])
    vehicle = Vehicle.objects.select_related("hardware").get(pk=vehicle.pk)  # the live state as it is now
    vehicle.policy = policy
    reason = vehicle_ineligibility(vehicle=vehicle, now=timezone.now())
    Vehicle.objects.filter(pk=vehicle.pk).update(ineligible_reason=reason or "")
    transaction.on_commit(lambda: vehicle_notify(vehicle_id=vehicle.pk, message={"type": "vehicle.policy"}))
    if reason:
        leases_withdraw(vehicle_id=vehicle.pk, reason=reason, notify=True)
    else:
        refused = [(unit.pk, unit.lease_epoch) for unit in WorkUnit.objects.filter(
            leased_to=vehicle, state=WorkUnit.State.LEASED).select_related("job__ai_model")
            if not vehicle_consents(vehicle=vehicle, job_category=unit.job.ai_model.task,
                                    organisation_id=unit.job.organisation_id)]
        if refused:
            leases_withdraw(vehicle_id=vehicle.pk, reason="consent", notify=True, only=refused)
    return policy


# --- live state ----------------------------------------------------------------------------------------

def vehicle_connected(*, vehicle_id: int, channel_name: str, agent_version: str, runtimes: list[str],
                      throughput_mops: dict[str, int], uplink_kbps: int | None,
                      held: list[tuple[int, int]],
                      tasks: tuple[str, ...] | list[str] = ("embedding",)) -> tuple[list[tuple[int, int]], GatewayView]:
    """The car said hello on ``channel_name``. Leases it still holds from an earlier session are resumed if
    they are still current; returns the ones it must drop, and the gateway's view of the car."""
    now = timezone.now()
    with transaction.atomic():
        Vehicle.objects.filter(pk=vehicle_id).update(
            connected=True, channel_name=channel_name, last_seen_at=now, agent_version=agent_version,
            runtimes=runtimes, tasks=list(tasks), throughput_mops=throughput_mops, uplink_kbps=uplink_kbps)
        stale = leases_reconcile(held_by={vehicle_id: held}, lost_by=None, now=now)[vehicle_id]
    return stale, vehicle_view_get(vehicle_id=vehicle_id)


def vehicle_view_get(*, vehicle_id: int) -> GatewayView:
    vehicle = Vehicle.objects.select_related("policy", "hardware").prefetch_related("hardware__throughputs").get(pk=vehicle_id)
    return vehicle_gateway_view(vehicle=vehicle, now=timezone.now())


def vehicle_disconnected(*, vehicle_id: int, channel_name: str) -> None:
    """The car's socket closed. Its leases stay until they expire, so that a car that reconnects in time
    resumes them (see vehicle_connected); a later connection (maybe on another gateway process) is left alone."""
    Vehicle.objects.filter(pk=vehicle_id, channel_name=channel_name).update(connected=False, channel_name="")


# What a car's telemetry writes. A car that talks to a gateway is connected there (this also undoes the
# sweep's "offline" when the car was only slow to be written).
LIVE_FIELDS = ("battery_pct", "driving", "plugged_in", "on_wifi", "charging_kw", "temp_c", "last_seen_at",
               "connected", "channel_name")


def vehicle_telemetry_record(*, vehicle_id: int, channel_name: str, battery_pct: float, driving: bool,
                             plugged_in: bool, on_wifi: bool, charging_kw: float = 0.0,
                             temp_c: float | None = None) -> tuple[list[tuple[int, int]], GatewayView]:
    """Store the car's state at once and decide; if it may no longer work, withdraw its leases. Returns the
    withdrawn leases and the gateway's fresh view. (Telemetry that changes no decision is written in batches:
    vehicles_live_record.)"""
    now = timezone.now()
    with transaction.atomic():
        vehicle = (Vehicle.objects.select_for_update(of=("self",)).select_related("policy", "hardware")
                   .prefetch_related("hardware__throughputs").get(pk=vehicle_id))
        vehicle.battery_pct, vehicle.driving, vehicle.plugged_in, vehicle.on_wifi = battery_pct, driving, plugged_in, on_wifi
        vehicle.charging_kw, vehicle.temp_c = charging_kw, temp_c
        vehicle.last_seen_at, vehicle.connected, vehicle.channel_name = now, True, channel_name
        decision, _ = vehicle_outlook(vehicle=vehicle, now=now)
        vehicle.ineligible_reason, vehicle.battery_hold = decision.reason or "", decision.battery_hold
        vehicle.save(update_fields=[*LIVE_FIELDS, "ineligible_reason", "battery_hold"])
        withdrawn = leases_withdraw(vehicle_id=vehicle_id, reason=decision.reason, notify=False) if decision.reason else []
    return withdrawn, vehicle_gateway_view(vehicle=vehicle, now=now, reason=decision.reason)


def vehicles_live_record(*, states: dict[int, dict], held_by: dict[int, list[tuple[int, int]]],
                         lost_by: dict[int, list[tuple[int, int]]]) -> dict[int, list]:
    """One gateway process's batch: live state that changed no decision (``states``: vehicle id -> the
    LIVE_FIELDS), and heartbeats (``held_by``: vehicle id -> the leases the car says it holds; ``lost_by``:
    leases sent to it that it does not know), which extend and reconcile leases (leases_reconcile). Returns,
    per heartbeat, the leases the car must drop."""
    now = timezone.now()
    with transaction.atomic():
        if states:  # one prepared statement, many rows (bulk_update's CASE expressions cost far more to build)
            table, columns = Vehicle._meta.db_table, ", ".join(f"{name} = %s" for name in LIVE_FIELDS)
            with connection.cursor() as cursor:
                cursor.executemany(f"UPDATE {table} SET {columns} WHERE id = %s",
                                   [[*(fields[name] for name in LIVE_FIELDS), pk] for pk, fields in sorted(states.items())])
        if not held_by:
            return {}
        Vehicle.objects.filter(pk__in=[pk for pk in held_by if pk not in states]).update(last_seen_at=now)
        return leases_reconcile(held_by=held_by, lost_by=lost_by, now=now)


def vehicle_data_flush(*, vehicle_id: int, data_bytes: int) -> GatewayView:
    """Periodic per car: book the network bytes it exchanged, and return the gateway's refreshed view."""
    vehicle_data_record(vehicle_id=vehicle_id, data_bytes=data_bytes)
    return vehicle_view_get(vehicle_id=vehicle_id)


# --- leases --------------------------------------------------------------------------------------------

def _lease_end(unit: WorkUnit, *, outcome: str, reason: str, now: datetime) -> None:
    Lease.objects.filter(unit=unit, epoch=unit.lease_epoch).update(outcome=outcome, reason=reason[:64], ended_at=now)


def _requeue(unit: WorkUnit, *, outcome: str, reason: str, now: datetime) -> None:
    _lease_end(unit, outcome=outcome, reason=reason, now=now)
    unit.state = WorkUnit.State.QUEUED
    unit.leased_to = None
    unit.leased_at = unit.lease_expires_at = unit.lease_deadline_at = None
    unit.allocation = None
    unit.price_micros = None
    unit.save(update_fields=["state", "leased_to", "leased_at", "lease_expires_at", "lease_deadline_at", "allocation",
                             "price_micros"])


def leases_withdraw(*, vehicle_id: int, reason: str, notify: bool, outcome: str = Lease.Outcome.WITHDRAWN,
                    only: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Take back a car's active leases (or only the listed ones) and requeue their units. The units are locked
    in id order (docs/concurrency.md), and only those listed when a list is given."""
    now = timezone.now()
    with transaction.atomic():
        units = WorkUnit.objects.select_for_update().filter(leased_to_id=vehicle_id, state=WorkUnit.State.LEASED)
        if only is not None:
            wanted = set(only)
            units = units.filter(pk__in=sorted({pk for pk, _ in wanted}))
        units = [u for u in units.order_by("pk") if only is None or (u.pk, u.lease_epoch) in wanted]
        withdrawn = [(u.pk, u.lease_epoch) for u in units]
        for unit in units:
            _requeue(unit, outcome=outcome, reason=reason, now=now)
        if notify and withdrawn:
            message = {"type": "vehicle.withdraw", "leases": withdrawn, "reason": reason}
            transaction.on_commit(lambda: vehicle_notify(vehicle_id=vehicle_id, message=message))
    return withdrawn


def _current_allocations(*, vehicle: Vehicle):
    """The car's unspent capacity in the latest auction tick (every market of a tick clears at the same
    instant): the best-paying market first, and in a market the highest bid first."""
    latest = AuctionRound.objects.order_by("-cleared_at").values("cleared_at")[:1]
    return (Allocation.objects.filter(vehicle=vehicle, round__cleared_at=Subquery(latest), remaining_mops__gt=0,
                                      job__state__in=Job.OPEN_STATES, job__ai_model__runtime__in=vehicle.runtimes,
                                      job__ai_model__task__in=vehicle.tasks)
            .select_related("job__ai_model").order_by("-price_micros", "-job__max_price_micros", "job_id"))


def _spare_allocations(*, vehicle: Vehicle, now: datetime):
    """Capacity of the latest tick that other cars won and leave unused, which ``vehicle`` (with none of its own
    left) may draw on (docs/vehicle-protocol.md, "Capacity is measured"): the tick is CAPACITY_RECLAIM_AFTER_S
    old and the holder holds no unit of the allocation (a car that uses its capacity holds a pipeline of its
    units; one that asks and can take none, e.g. when what is left are replicas of its own owner's results,
    holds none, like one that does not ask); the job is open, runs on this car's runtimes and hardware, and pays the
    allocation's price, which is within the job's bid and at least this car's reserve. Best price first."""
    idle_since = now - timedelta(seconds=settings.CAPACITY_RECLAIM_AFTER_S)
    latest = AuctionRound.objects.order_by("-cleared_at").values("cleared_at")[:1]
    holder_holds = WorkUnit.objects.filter(allocation=OuterRef("pk"), state=WorkUnit.State.LEASED,
                                           leased_to=OuterRef("vehicle_id"))
    return (Allocation.objects.filter(
                round__cleared_at=Subquery(latest), round__cleared_at__lte=idle_since, remaining_mops__gt=0,
                job__state__in=Job.OPEN_STATES, job__ai_model__runtime__in=vehicle.runtimes,
                job__ai_model__task__in=vehicle.tasks,
                job__precision__in=[t.precision for t in vehicle.hardware.throughputs.all()],
                price_micros__gte=vehicle.policy.reserve_price_micros, price_micros__lte=F("job__max_price_micros"))
            .exclude(vehicle_id=vehicle.pk).exclude(Exists(holder_holds))
            .select_related("job__ai_model").order_by("-price_micros", "-job__max_price_micros", "job_id", "pk")[:20])


def _allocation_fit(*, allocation_id: int, units: list[WorkUnit], unit_mops: int) -> list[WorkUnit]:
    """The claimed ``units`` (in sequence order) that the allocation's remainder covers, read again under its
    row lock (rank 5, after the units: docs/concurrency.md): as many as ``ceil(remainder / unit_mops)``, the
    rule the claim was sized by, so the last may overrun it by less than a unit; the rest are put back in the
    queue. Another car may draw on an allocation its holder leaves unused (_spare_allocations), so the
    remainder read before the claim may be stale: the lock makes the flow's draw
    (marketplace.services.allocation_draw, in this transaction) safe on any number of gateways."""
    remaining = (Allocation.objects.select_for_update().filter(pk=allocation_id)
                 .values_list("remaining_mops", flat=True).first()) or 0
    kept = units[:max(0, -(-remaining // max(1, unit_mops)))]
    if len(kept) < len(units):
        WorkUnit.objects.filter(pk__in=[u.pk for u in units[len(kept):]]).update(
            state=WorkUnit.State.QUEUED, leased_to=None, leased_at=None, lease_expires_at=None,
            lease_deadline_at=None, allocation=None, price_micros=None, attempts=F("attempts") - 1)
    return kept


# Lease a batch of a job's queued units in sequence order, in one statement. On PostgreSQL the units are
# picked with FOR UPDATE SKIP LOCKED, so concurrent leasers (any number of gateway processes) never wait for
# each other nor lease a unit twice; SQLite has a single writer (transactions are IMMEDIATE) and no row locks.
_CLAIM_SQL = """
UPDATE fleet_workunit SET state = %s, leased_to_id = %s, lease_epoch = lease_epoch + 1, leased_at = %s,
    lease_expires_at = %s, lease_deadline_at = %s, allocation_id = %s, price_micros = %s, attempts = attempts + 1
WHERE id IN (SELECT id FROM fleet_workunit WHERE job_id = %s AND state = %s AND verify <> %s
    AND (verify_owner_id IS NULL OR verify_owner_id <> %s) ORDER BY seq LIMIT %s {lock})
RETURNING id, seq, lease_epoch, {inputs}, mops, tokens"""


def _units_claim(*, job_id: int, count: int, vehicle_id: int, owner_id: int, allocation: Allocation, now: datetime,
                 lifetime_s: float, with_inputs: bool = True) -> list[WorkUnit]:
    """Claim up to ``count`` of the job's queued units that a car of ``owner_id`` may have: not one waiting for
    the platform, nor a replica of its owner's own result (fleet.verification). Without ``with_inputs`` (inputs
    the car fetches by URL: megabytes of page images) the units come back with ``inputs`` None."""
    lock = "FOR UPDATE SKIP LOCKED" if connection.vendor == "postgresql" else ""
    inputs_field = WorkUnit._meta.get_field("inputs")
    deadline = now + timedelta(seconds=lifetime_s)
    expires = min(deadline, now + timedelta(seconds=settings.LEASE_TTL_S))
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL.format(lock=lock, inputs="inputs" if with_inputs else "NULL"), [
            WorkUnit.State.LEASED, vehicle_id, now, expires, deadline, allocation.pk, allocation.price_micros, job_id,
            WorkUnit.State.QUEUED, WorkUnit.Verify.ARBITER, owner_id, count])
        rows = cursor.fetchall()
    units = [WorkUnit(pk=pk, job_id=job_id, seq=seq, lease_epoch=epoch, mops=mops, tokens=tokens,
                      inputs=inputs_field.from_db_value(inputs, None, connection), state=WorkUnit.State.LEASED,
                      leased_to_id=vehicle_id, leased_at=now, lease_expires_at=expires, lease_deadline_at=deadline,
                      allocation=allocation,
                      price_micros=allocation.price_micros)
             for pk, seq, epoch, inputs, mops, tokens in rows]
    return sorted(units, key=lambda u: u.seq)


def units_lease(*, vehicle_id: int, max_units: int | None = None,
                inflight_limit: int | None = None) -> tuple[list[WorkUnit], str]:
    """Lease the car a batch of units of the best-paying job it won capacity for (the flow,
    marketplace.flows.units_lease, then draws them from the allocation), sized to the car (fleet.dispatch:
    within the in-flight limit its welcome announced, and no more than it can finish, at the rate it proved
    and over its uplink, in its remaining working time; at most ``max_units``). A car with no capacity of its
    own left draws on capacity other cars won and leave unused (_spare_allocations). Returns (units, "") or
    ([], why not); units of a workload whose inputs the car fetches by URL come without their ``inputs``.

    Safe under any number of concurrent gateway processes: the car's row is locked, units are claimed with
    SELECT ... FOR UPDATE SKIP LOCKED (PostgreSQL), and the allocation's remainder is read again under its row
    lock before the leases are made (_allocation_fit), since another car may draw on it too. Units are leased
    while the allocation has capacity left, so the last one may overrun it by less than a unit.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        vehicle = (Vehicle.objects.select_for_update(of=("self",)).select_related("policy", "hardware")
                   .prefetch_related("hardware__throughputs", "policy__blocked_organisations", "rates").get(pk=vehicle_id))
        if vehicle.suspended_at is not None:
            return [], "suspended"
        decision, time_left = vehicle_outlook(vehicle=vehicle, now=now)
        if decision.reason:
            return [], decision.reason
        held = WorkUnit.objects.filter(leased_to=vehicle, state=WorkUnit.State.LEASED).count()
        # Its in-flight limit now (it falls with strikes at once), never above what its welcome announced
        # (``inflight_limit``): a proven rate raises the limit only at its next hello, and the car releases
        # what it cannot hold (over_capacity), which would waste the allocation drawn for it.
        limit = vehicle_inflight_limit(vehicle=vehicle)
        if inflight_limit is not None:
            limit = min(limit, inflight_limit)
        if held >= limit:
            return [], "lease_limit"

        def allocations():
            yield from _current_allocations(vehicle=vehicle)  # its own first
            yield from _spare_allocations(vehicle=vehicle, now=now)  # read only when its own gave nothing

        for allocation in allocations():
            job = allocation.job
            if not vehicle_consents(vehicle=vehicle, job_category=job.ai_model.task, organisation_id=job.organisation_id):
                continue
            unit_mops = max(1, job.mops_total // max(1, job.units_total))
            workload = workloads.get(job.ai_model.task)
            unit_docs = -(-job.docs_total // max(1, job.units_total))
            fetched = 0 if workload.inline_inputs else workload.input_bytes_per_doc * unit_docs
            unit_s = dispatch.unit_seconds(unit_mops=unit_mops, result_bytes=workload.result_bytes_per_doc * unit_docs,
                                           input_bytes=fetched, uplink_kbps=vehicle.uplink_kbps,
                                           mops_per_s=vehicle_mops_per_s(vehicle=vehicle, precision=job.precision))
            count = dispatch.batch_size(limit=limit, held=held, unit_s=unit_s, time_left_s=time_left)
            if count == 0:
                return [], "leaving_soon"
            count = min(count, max_units or count, -(-allocation.remaining_mops // unit_mops))
            if fetched and (data_left := vehicle_data_left_bytes(vehicle=vehicle, now=now)) is not None:
                # Inputs fetched by URL count against the owner's data budget: lease only what it still covers.
                count = min(count, data_left // fetched)
                if count == 0:
                    continue
            # Its leases live at most a few times what the car needs for all it will hold (fleet.dispatch).
            lifetime = dispatch.lease_lifetime_s(work_s=(held + count) * unit_s, ttl_s=settings.LEASE_TTL_S,
                                                 max_s=settings.LEASE_MAX_LIFETIME_S)
            units = _units_claim(job_id=job.pk, count=count, vehicle_id=vehicle_id, owner_id=vehicle.owner_id,
                                 allocation=allocation, now=now, lifetime_s=lifetime, with_inputs=workload.inline_inputs)
            if units:
                units = _allocation_fit(allocation_id=allocation.pk, units=units, unit_mops=unit_mops)
            if not units:
                continue
            Lease.objects.bulk_create(Lease(unit_id=u.pk, vehicle_id=vehicle_id, epoch=u.lease_epoch,
                                            price_micros=u.price_micros, started_at=now) for u in units)
            for unit in units:
                unit.job = job
            return units, ""
        return [], "no_work"


def leases_reconcile(*, held_by: dict[int, list[tuple[int, int]]], lost_by: dict[int, list[tuple[int, int]]] | None,
                     now: datetime) -> dict[int, list[tuple[int, int]]]:
    """Heartbeats (or a hello) of several cars: extend their leases and reconcile them with what each says it
    holds. Returns per car the leases it holds that are no longer current (it must drop them). The leases in
    ``lost_by`` (the gateway sent them, and a later heartbeat did not list them: the assignment was lost) are
    requeued; ``lost_by=None`` requeues every current lease a car does not list (a hello: nothing can be on
    its way to a new connection yet)."""
    with transaction.atomic():
        active = WorkUnit.objects.filter(leased_to_id__in=list(held_by), state=WorkUnit.State.LEASED)
        current: dict[int, set[tuple[int, int]]] = {pk: set() for pk in held_by}
        for pk, epoch, vehicle_id in active.values_list("pk", "lease_epoch", "leased_to_id"):
            current[vehicle_id].add((pk, epoch))
        stale = {}
        for vehicle_id, held in held_by.items():
            held_set = {tuple(ref) for ref in held}
            unlisted = current[vehicle_id] - held_set
            lost = unlisted if lost_by is None else unlisted & {tuple(ref) for ref in lost_by.get(vehicle_id, ())}
            if lost:
                leases_withdraw(vehicle_id=vehicle_id, reason="not_held", notify=False, only=sorted(lost))
            stale[vehicle_id] = sorted(held_set - current[vehicle_id])
        _leases_extend(vehicle_ids=sorted(held_by), until=now + timedelta(seconds=settings.LEASE_TTL_S))
    return stale


# Extend the cars' current leases. On PostgreSQL the units are taken with SKIP LOCKED: a unit that another
# transaction holds (its result being booked, its job closing) is about to end anyway, and a heartbeat must
# never wait for, nor deadlock with, a job's flows (docs/concurrency.md). Should that transaction roll back,
# the car's next heartbeat, well within the lease's TTL, extends it.
_EXTEND_SQL = """
UPDATE fleet_workunit SET lease_expires_at = LEAST(%s, COALESCE(lease_deadline_at, %s))
WHERE id IN (SELECT id FROM fleet_workunit WHERE leased_to_id = ANY(%s) AND state = %s FOR UPDATE SKIP LOCKED)"""


def _leases_extend(*, vehicle_ids: list[int], until: datetime) -> None:
    """Extend the cars' current leases to ``until``, but never past a lease's deadline."""
    if connection.vendor != "postgresql":  # SQLite: one writer, nothing to skip
        WorkUnit.objects.filter(leased_to_id__in=vehicle_ids, state=WorkUnit.State.LEASED).update(
            lease_expires_at=Least(Value(until), Coalesce(F("lease_deadline_at"), Value(until))))
        return
    with connection.cursor() as cursor:
        cursor.execute(_EXTEND_SQL, [until, until, vehicle_ids, WorkUnit.State.LEASED])


def leases_sweep(*, batch: int = 500) -> int:
    """Requeue expired leases and mark silent cars offline. The database, not a timer, is the truth. A lease
    that ran out (no heartbeat for it, or its deadline reached however the car heartbeats) is a strike against
    its car (vehicle_strikes_add)."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.VEHICLE_STALE_AFTER_S)
    with transaction.atomic():
        silent = list(Vehicle.objects.filter(connected=True, last_seen_at__lt=stale).values_list("pk", flat=True))
        Vehicle.objects.filter(pk__in=silent).update(connected=False, channel_name="")
        expired = list(WorkUnit.objects.select_for_update(skip_locked=True)
                       .filter(state=WorkUnit.State.LEASED, lease_expires_at__lt=now)[:batch])
        by_car_and_reason: dict[tuple[int, str], list] = defaultdict(list)
        for unit in expired:
            at_deadline = unit.lease_deadline_at is not None and unit.lease_expires_at >= unit.lease_deadline_at
            reason = "lease_deadline" if at_deadline else "lease_expired"
            by_car_and_reason[unit.leased_to_id, reason].append((unit.pk, unit.lease_epoch))
            _requeue(unit, outcome=Lease.Outcome.EXPIRED, reason=reason, now=now)
        for vehicle_id in silent:
            leases_withdraw(vehicle_id=vehicle_id, reason="offline", notify=False)
        for (vehicle_id, reason), refs in by_car_and_reason.items():
            message = {"type": "vehicle.withdraw", "leases": refs, "reason": reason}
            transaction.on_commit(lambda v=vehicle_id, m=message: vehicle_notify(vehicle_id=v, message=m))
    # One strike per car and sweep, however many of its leases ran out together; booked after the units are
    # let go (should this not run, the strike is lost, nothing else).
    for vehicle_id in sorted({vehicle_id for vehicle_id, _ in by_car_and_reason}):
        vehicle_strikes_add(vehicle_id=vehicle_id, strikes=1, now=now)
    return len(expired)


def vehicle_strikes_add(*, vehicle_id: int, strikes: int, now: datetime) -> None:
    """Count ``strikes`` against the car (its leases ran out without a result), on top of those it still carries
    (fleet.dispatch.strikes_standing). Its own transaction: the car's row comes before units in the lock
    order (docs/concurrency.md), so the sweep books strikes after it has let its units go."""
    with transaction.atomic():
        vehicle = Vehicle.objects.select_for_update().only("lease_strikes", "lease_strike_at").get(pk=vehicle_id)
        since = None if vehicle.lease_strike_at is None else (now - vehicle.lease_strike_at).total_seconds()
        standing = dispatch.strikes_standing(strikes=vehicle.lease_strikes, since_s=since,
                                             forgive_s=settings.LEASE_STRIKE_FORGIVE_S)
        Vehicle.objects.filter(pk=vehicle_id).update(lease_strikes=min(standing + strikes, 1000), lease_strike_at=now)


# --- results -------------------------------------------------------------------------------------------

def result_problem(*, unit: WorkUnit, result: list) -> str | None:
    """Why a car's result for ``unit`` cannot be accepted (its shape, by the job's workload), or None."""
    job = unit.job
    return workloads.get(job.ai_model.task).result_problem(workloads.ModelInfo.of(job.ai_model), job.params,
                                                           len(unit.inputs), result)


def results_agree(*, unit: WorkUnit, a: list, b: list) -> bool:
    """Whether two results of ``unit`` are the same answer (fleet.verification.results_agree, for its job)."""
    job = unit.job
    return verification.results_agree(a, b, precision=job.precision, task=job.ai_model.task, params=job.params)


def energy_mwh(*, mops: int, mops_per_s: int, watts: int) -> int:
    """Energy the car spends computing ``mops`` at ``mops_per_s`` while drawing ``watts``, in milliwatt-hours
    (rounded up)."""
    return math.ceil(watts * mops * 1000 / (mops_per_s * 3600))


@dataclass(frozen=True)
class Payment:
    """A result to pay: the lease (its car and epoch) and who pays, the buyer for the unit's result or the
    platform for a check (billing.models.MeterRecord.Role)."""

    vehicle: Vehicle
    epoch: int
    role: str
    price_micros: int
    energy_mwh: int
    duration_ms: int
    ended_at: datetime


@dataclass
class Verdict:
    """What a result (or the platform's reference) settled for a unit: the results to pay, whether the unit is
    done now, the cars whose results were wrong (marketplace.flows.vehicle_caught), the cars whose results a check
    found right or that were accepted (standing, after the transaction), and whether the unit waits for the
    platform's reference (marketplace.flows.unit_arbitrate)."""

    payments: list[Payment] = field(default_factory=list)
    done: bool = False
    caught: list[int] = field(default_factory=list)
    passed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    arbitrate: bool = False


_random = secrets.SystemRandom()  # which results are checked: nobody outside can predict it


def _payment(lease: Lease, *, vehicle: Vehicle, role: str, unit: WorkUnit, precision: str) -> Payment:
    rate = vehicle_mops_per_s(vehicle=vehicle, precision=precision)  # how long it worked, what it cost the car
    ended = lease.ended_at or timezone.now()
    return Payment(vehicle=vehicle, epoch=lease.epoch, role=role, price_micros=lease.price_micros,
                   energy_mwh=energy_mwh(mops=unit.mops, mops_per_s=max(1, rate), watts=vehicle.hardware.watts),
                   duration_ms=max(0, int((ended - lease.started_at).total_seconds() * 1000)), ended_at=ended)


def _unit_done(unit: WorkUnit, *, result: list[str], vehicle: Vehicle | None, now: datetime) -> None:
    unit.state = WorkUnit.State.DONE
    unit.result = result
    unit.completed_by = vehicle
    unit.completed_at = now
    unit.leased_to = None
    unit.lease_expires_at = unit.lease_deadline_at = None
    unit.verify, unit.verify_owner, unit.verify_since = WorkUnit.Verify.NONE, None, None
    unit.save(update_fields=["state", "result", "completed_by", "completed_at", "leased_to", "lease_expires_at",
                             "lease_deadline_at", "verify", "verify_owner", "verify_since"])


def _unit_wait(unit: WorkUnit, *, verify: str, owner_id: int | None, now: datetime) -> None:
    """Queue the unit again, for a replica by a car of another owner than ``owner_id``, or for the platform."""
    unit.state, unit.leased_to = WorkUnit.State.QUEUED, None
    unit.leased_at = unit.lease_expires_at = unit.lease_deadline_at = None
    if verify == WorkUnit.Verify.NONE:  # recomputed from scratch; a result waiting for its check used its car's
        unit.allocation = None          # allocation (vehicles_standing counts it when the check settles it)
    unit.price_micros = None
    unit.verify, unit.verify_owner_id, unit.verify_since = verify, owner_id, now
    unit.save(update_fields=["state", "leased_to", "leased_at", "lease_expires_at", "lease_deadline_at", "allocation",
                             "price_micros", "verify", "verify_owner", "verify_since"])


def _standing(vehicle: Vehicle, now: datetime) -> verification.Standing:
    recent = vehicle.wrong_recent if vehicle.wrong_at and now - vehicle.wrong_at < timedelta(
        days=verification.STRIKE_MEMORY_DAYS) else 0
    return verification.Standing(streak=vehicle.results_streak, wrong_recent=recent)


#: How many connected cars of other owners _replicable looks at for one that runs a unit's workload.
_REPLICA_CANDIDATES = 50


def _replicable(*, owner_id: int, unit: WorkUnit) -> bool:
    """Whether a car of another owner is there to compute a replica of ``unit`` (connected, at its precision,
    running its model and workload: among the first _REPLICA_CANDIDATES such cars; if none of those runs it,
    the platform arbitrates at once, which is always safe)."""
    ai_model = unit.job.ai_model
    candidates = (Vehicle.objects.filter(connected=True, removed_at=None, suspended_at=None,
                                         hardware__throughputs__precision=unit.job.precision)
                  .exclude(owner_id=owner_id).values_list("runtimes", "tasks")[:_REPLICA_CANDIDATES])
    return any(ai_model.runtime in runtimes and ai_model.task in tasks for runtimes, tasks in candidates)


def unit_result_accept(*, unit: WorkUnit | None, vehicle_id: int, epoch: int,
                       result: list) -> tuple[Verdict | None, str]:
    """A car's result for ``unit`` (its row locked by the flow, marketplace.flows.unit_complete), for the car's
    current lease: the lease ends and the result is judged (fleet.verification, docs/verification.md), or it is
    refused (None, why). A result for a stale, expired, withdrawn or foreign lease is refused; a malformed one
    is refused and its unit requeued for another car. The car is told nothing of the judgement: an accepted
    result is accepted whether it was paid at once, waits for its check or was found wrong."""
    now = timezone.now()
    if unit is None or unit.state != WorkUnit.State.LEASED or unit.leased_to_id != vehicle_id or unit.lease_epoch != epoch:
        return None, "stale_lease"
    vehicle = (Vehicle.objects.select_related("hardware", "owner").prefetch_related("hardware__throughputs")
               .get(pk=vehicle_id))
    problem = result_problem(unit=unit, result=result)
    if problem:
        _requeue(unit, outcome=Lease.Outcome.WITHDRAWN, reason="bad_result", now=now)
        return None, f"bad_result: {problem}"
    precision = unit.job.precision
    lease = Lease.objects.get(unit=unit, epoch=epoch)
    lease.outcome, lease.ended_at = Lease.Outcome.COMPLETED, now

    def settle(verdict: str, *, keep: bool = False) -> None:
        lease.verdict, lease.result = verdict, (result if keep else None)
        lease.save(update_fields=["outcome", "ended_at", "verdict", "result"])

    if unit.reference is not None:  # a canary, or a unit the platform computed already: checked against it
        if results_agree(unit=unit, a=result, b=unit.reference):
            settle(Lease.Verdict.RIGHT)
            _unit_done(unit, result=result, vehicle=vehicle, now=now)
            return Verdict(payments=[_payment(lease, vehicle=vehicle, role="buyer", unit=unit, precision=precision)],
                           done=True, passed=[vehicle_id]), ""
        settle(Lease.Verdict.WRONG)
        _unit_wait(unit, verify=WorkUnit.Verify.NONE, owner_id=None, now=now)
        return Verdict(caught=[vehicle_id]), ""
    if unit.verify == WorkUnit.Verify.REPLICA:  # the second result (the claim let only another owner's car have it)
        first = (Lease.objects.select_related("vehicle__hardware", "vehicle__owner")
                 .prefetch_related("vehicle__hardware__throughputs")
                 .filter(unit=unit, verdict=Lease.Verdict.PENDING).order_by("epoch").first())
        if first is not None and results_agree(unit=unit, a=result, b=first.result):
            result = first.result
            first.verdict, first.result = Lease.Verdict.AGREED, None
            first.save(update_fields=["verdict", "result"])
            settle(Lease.Verdict.AGREED)
            _unit_done(unit, result=result, vehicle=first.vehicle, now=now)
            return Verdict(payments=[_payment(first, vehicle=first.vehicle, role="buyer", unit=unit, precision=precision),
                                     _payment(lease, vehicle=vehicle, role="check", unit=unit, precision=precision)],
                           done=True, passed=[first.vehicle_id, vehicle_id]), ""
        settle(Lease.Verdict.PENDING, keep=True)  # they disagree (or the first is gone): the platform decides
        _unit_wait(unit, verify=WorkUnit.Verify.ARBITER, owner_id=None, now=now)
        return Verdict(arbitrate=True), ""
    if _random.random() < verification.replication_rate(_standing(vehicle, now), probation=settings.VERIFY_PROBATION,
                                                        floor=settings.VERIFY_REPLICATION_FLOOR):
        settle(Lease.Verdict.PENDING, keep=True)
        if _replicable(owner_id=vehicle.owner_id, unit=unit):
            _unit_wait(unit, verify=WorkUnit.Verify.REPLICA, owner_id=vehicle.owner_id, now=now)
            return Verdict(), ""
        _unit_wait(unit, verify=WorkUnit.Verify.ARBITER, owner_id=None, now=now)
        return Verdict(arbitrate=True), ""
    settle(Lease.Verdict.UNCHECKED)
    _unit_done(unit, result=result, vehicle=vehicle, now=now)
    return Verdict(payments=[_payment(lease, vehicle=vehicle, role="buyer", unit=unit, precision=precision)],
                   done=True, accepted=[vehicle_id]), ""


def unit_reference_compute(*, unit_id: int) -> list | None:
    """The platform's own result for a unit, computed with the reference runtime at the job's precision (the
    agent's own workload code, fleet.agent.workloads; no transaction is held meanwhile); None if the unit is
    gone."""
    row = (WorkUnit.objects.filter(pk=unit_id)
           .values_list("inputs", "job__ai_model__runtime", "job__ai_model__task", "job__params", "job__precision")
           .first())
    if row is None:
        return None
    inputs, runtime, task, params, precision = row
    if not inputs:  # the job's data was deleted: nothing to compute
        return None
    return agent_workloads.compute(task, [doc["text"] for doc in inputs],
                                   workloads.get(task).unit_params(params), get_runner(runtime, precision).infer)


def unit_arbitrate(*, unit: WorkUnit, reference: list[str]) -> Verdict:
    """The platform computed ``unit`` (its row locked by the flow, marketplace.flows.unit_arbitrate): the results
    that wait on its leases are judged against the reference. The first right one is the unit's result (the
    buyer pays it), a later right one is a check (the platform pays it), wrong ones catch their cars. With no
    right result, the unit is queued again with the reference as its known answer. A unit done already (its
    result voided when its car was caught, in a job closed since) gets the reference as its corrected result."""
    now = timezone.now()
    precision = unit.job.precision
    unit.reference = reference
    unit.save(update_fields=["reference"])
    waiting = list(Lease.objects.select_related("vehicle__hardware", "vehicle__owner")
                   .prefetch_related("vehicle__hardware__throughputs")
                   .filter(unit=unit, verdict=Lease.Verdict.PENDING).order_by("epoch"))
    verdict = Verdict()
    right = [lease for lease in waiting if results_agree(unit=unit, a=lease.result, b=reference)]
    result = right[0].result if right else None
    for lease in waiting:
        lease.verdict = Lease.Verdict.RIGHT if lease in right else Lease.Verdict.WRONG
        lease.result = None
        lease.save(update_fields=["verdict", "result"])
        if lease not in right:
            verdict.caught.append(lease.vehicle_id)
    if unit.state == WorkUnit.State.DONE:  # a correction of a closed job's unit
        _unit_done(unit, result=reference, vehicle=None, now=unit.completed_at or now)
        return verdict
    if unit.verify != WorkUnit.Verify.ARBITER:  # leased again meanwhile (it should not be): leave it to its lease
        return verdict
    if right:
        _unit_done(unit, result=result, vehicle=right[0].vehicle, now=now)
        verdict.payments.extend(_payment(lease, vehicle=lease.vehicle, role="buyer" if i == 0 else "check", unit=unit,
                                         precision=precision) for i, lease in enumerate(right))
        verdict.passed.extend(lease.vehicle_id for lease in right)
        verdict.done = True
    else:
        _unit_wait(unit, verify=WorkUnit.Verify.NONE, owner_id=None, now=now)
    return verdict


def units_verify_overdue(*, now: datetime, batch: int = 200) -> list[int]:
    """Units the platform must compute now: replicas no car of another owner took within REPLICA_WAIT_S (they
    wait for the platform from now on), and arbitrations pending for as long (their task was lost)."""
    since = now - timedelta(seconds=settings.REPLICA_WAIT_S)
    replicas = WorkUnit.objects.filter(state=WorkUnit.State.QUEUED, verify=WorkUnit.Verify.REPLICA, verify_since__lt=since)
    with transaction.atomic():  # the rows locked, so that no car claims one between the read and the update
        overdue = list(replicas.select_for_update(skip_locked=True).values_list("pk", flat=True)[:batch])
        replicas.filter(pk__in=overdue).update(verify=WorkUnit.Verify.ARBITER, verify_owner=None, verify_since=now)
    stuck = list(WorkUnit.objects.filter(verify=WorkUnit.Verify.ARBITER, verify_since__lt=since)
                 .values_list("pk", flat=True)[:batch])
    WorkUnit.objects.filter(pk__in=stuck).update(verify_since=now)
    return sorted(set(overdue) | set(stuck))


def units_canaries_pick(*, job: Job) -> list[int]:
    """Pick the job's canaries: CANARY_SHARE of its units (at least one, unless the share is 0), drawn at random; the platform computes
    their answers (marketplace.flows.units_reference) while they wait in the queue like any other unit."""
    ids = list(WorkUnit.objects.filter(job=job).values_list("pk", flat=True))
    count = min(len(ids), max(1, round(len(ids) * settings.CANARY_SHARE))) if settings.CANARY_SHARE > 0 else 0
    return sorted(_random.sample(ids, count))


def unit_reference_set(*, unit_id: int, reference: list[str]) -> bool:
    """Give a still-queued unit its known answer (a canary); False if a car has it already."""
    return bool(WorkUnit.objects.filter(pk=unit_id, state=WorkUnit.State.QUEUED, reference__isnull=True)
                .update(reference=reference))


# --- standing ------------------------------------------------------------------------------------------

def vehicles_standing_record(*, passed: list[int], accepted: list[int]) -> None:
    """Count results checks found right (``passed``) and results accepted unchecked (``accepted``) into their
    cars' standing. Its own transaction, after the result's: a car's row comes before units in the lock order
    (docs/concurrency.md)."""
    with transaction.atomic():
        for vehicle_id in sorted(set(passed) | set(accepted)):
            checked = passed.count(vehicle_id)
            Vehicle.objects.filter(pk=vehicle_id).update(
                results_streak=F("results_streak") + checked + accepted.count(vehicle_id),
                checks_passed=F("checks_passed") + checked)


def vehicle_wrong_record(*, vehicle_id: int, now: datetime) -> bool:
    """A result of the car was found wrong: its streak starts again, every result of it is checked for a while,
    and past SUSPEND_AFTER_WRONG recent wrong results it is suspended (its leases withdrawn, no more work until
    an operator reinstates it). Returns whether it is suspended now."""
    with transaction.atomic():
        vehicle = Vehicle.objects.select_for_update().get(pk=vehicle_id)
        standing, suspend = verification.standing_after_wrong(_standing(vehicle, now))
        vehicle.results_streak, vehicle.wrong_recent, vehicle.wrong_at = 0, standing.wrong_recent, now
        vehicle.wrong_results += 1
        fields = ["results_streak", "wrong_recent", "wrong_at", "wrong_results"]
        if suspend and vehicle.suspended_at is None:
            vehicle.suspended_at = now
            vehicle.suspension_reason = (f"{standing.wrong_recent} results disagreed with the platform's reference "
                                         f"within {verification.STRIKE_MEMORY_DAYS} days")
            fields += ["suspended_at", "suspension_reason"]
        vehicle.save(update_fields=fields)
        if vehicle.suspended_at is not None:
            leases_withdraw(vehicle_id=vehicle_id, reason="suspended", notify=True)
        return vehicle.suspended_at is not None


def vehicle_reinstate(*, vehicle: Vehicle) -> None:
    """An operator lifts a car's suspension: it starts again as a new car (every result checked at first)."""
    Vehicle.objects.filter(pk=vehicle.pk).update(suspended_at=None, suspension_reason="", wrong_recent=0,
                                                 results_streak=0)


def units_void_pick(*, vehicle_id: int, since: datetime) -> dict[int, list[tuple[int, int]]]:
    """The car's results accepted unchecked since ``since`` (its unit still holds them): by job, (unit, epoch)."""
    rows = (Lease.objects.filter(vehicle_id=vehicle_id, verdict=Lease.Verdict.UNCHECKED, ended_at__gte=since,
                                 unit__completed_by_id=vehicle_id, unit__state=WorkUnit.State.DONE)
            .values_list("unit__job_id", "unit_id", "epoch").order_by("unit__job_id", "unit_id"))
    by_job: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for job_id, unit_id, lease_epoch in rows:
        by_job[job_id].append((unit_id, lease_epoch))
    return by_job


def units_void(*, job: Job, vehicle_id: int, refs: list[tuple[int, int]], reopen: bool) -> list[WorkUnit]:
    """Void the car's unchecked results of ``refs`` (units of ``job``, locked by the flow). ``reopen`` (the job is
    still open): the units are queued again for other cars; else (its results went out) they stay done and wait
    for the platform's reference, their corrected result. Returns the units voided."""
    voided = []
    now = timezone.now()
    for unit in WorkUnit.objects.select_for_update().filter(pk__in=[pk for pk, _ in refs]).order_by("pk"):
        epoch = dict(refs)[unit.pk]
        if unit.state != WorkUnit.State.DONE or unit.completed_by_id != vehicle_id:
            continue
        if not Lease.objects.filter(unit=unit, epoch=epoch, verdict=Lease.Verdict.UNCHECKED).update(
                verdict=Lease.Verdict.VOIDED):
            continue
        unit.job = job
        if reopen:
            unit.result, unit.completed_by, unit.completed_at = None, None, None
            unit.save(update_fields=["result", "completed_by", "completed_at"])
            _unit_wait(unit, verify=WorkUnit.Verify.NONE, owner_id=None, now=now)
        elif job.data_deleted_at is None:  # (a job whose data was deleted has no result left to correct)
            unit.verify, unit.verify_since = WorkUnit.Verify.ARBITER, now
            unit.save(update_fields=["verify", "verify_since"])
        voided.append((unit, epoch))
    return voided


# --- proven capacity ------------------------------------------------------------------------------------
# docs/vehicle-protocol.md, "Capacity is measured".

def vehicle_rate_record(*, vehicle_id: int, precision: str, mops: int, duration_ms: int, now: datetime) -> None:
    """A result of ``mops`` mega-ops at ``precision`` was accepted ``now``, ``duration_ms`` after its lease began:
    add it to what the car delivered (VehicleRate), in the transaction that accepts it.

    The working time it adds is the part of its lease not already counted, ``now - max(lease start,
    busy_until)``, so that units the car held at once (pipelined) count their common time once: a car given
    four units at t and finishing them at t+1, t+2, t+3, t+4 worked 4 s, not 10. Both sums decay by
    ``exp(-added / CAPACITY_RATE_WINDOW_S)`` first, so the rate follows the car's last minute or so of work,
    and time it was idle changes nothing. One UPDATE of the car's rate row (a second and third, only the first
    time): its own row, after the unit and lease rows and before the ledger accounts (docs/concurrency.md),
    contended only by the car's other completions."""
    end = now.timestamp()
    start = end - max(0, duration_ms) / 1000
    added = Greatest(Value(0.0), Value(end) - Greatest(Value(start), F("busy_until"), output_field=FloatField()),
                     output_field=FloatField())
    weight = Exp(Value(-1.0 / settings.CAPACITY_RATE_WINDOW_S) * added, output_field=FloatField())
    fields = {"mops": F("mops") * weight + Value(float(mops)), "busy_s": F("busy_s") * weight + added,
              "busy_until": Greatest(F("busy_until"), Value(end), output_field=FloatField()),
              "units": F("units") + 1, "delivered_at": Value(now)}
    rows = VehicleRate.objects.filter(vehicle_id=vehicle_id, precision=precision)
    if not rows.update(**fields):
        VehicleRate.objects.bulk_create([VehicleRate(vehicle_id=vehicle_id, precision=precision)], ignore_conflicts=True)
        rows.update(**fields)


def vehicles_asked_record(*, asked: dict[int, datetime], check: list[int] | None = None) -> None:
    """One gateway process's batch of work requests (``asked``: car -> when it last sent work.request), written
    in one statement per car in id order and its own transaction (the cars' rows alone, rank 1); then the cars
    in ``check`` have their hardware class checked (vehicles_hardware_check)."""
    if asked:
        table = Vehicle._meta.db_table
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(f"UPDATE {table} SET work_requested_at = %s WHERE id = %s",
                               [[connection.ops.adapt_datetimefield_value(at), pk] for pk, at in sorted(asked.items())])
    if check:
        vehicles_hardware_check(vehicle_ids=check)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def vehicles_hardware_check(*, vehicle_ids: list[int]) -> None:
    """Check the cars' hardware class against what they deliver: a car that worked HARDWARE_CHECK_MIN_BUSY_S or
    more at a precision and delivers less than HARDWARE_MISMATCH_SHARE of the median of its class's cars there
    (taken over the cars with that much work, at least HARDWARE_CLASS_MIN_CARS of them, itself included) is
    flagged ``hardware_mismatch`` with a plain-English reason; a flag is lifted when the rule no longer holds.
    Compared with what cars of the class really deliver, never with the class's nominal TOPS, which no car
    reaches. A flagged car is sold at what it delivered, like every car (fleet.selectors.vehicle_mops_per_s)."""
    cars = list(Vehicle.objects.filter(pk__in=vehicle_ids).select_related("hardware")
                .only("pk", "hardware__code", "hardware__name", "hardware_mismatch", "hardware_mismatch_reason"))
    if not cars:
        return
    proven = (VehicleRate.objects.filter(vehicle__hardware_id__in={car.hardware_id for car in cars},
                                         vehicle__removed_at=None, busy_s__gte=settings.HARDWARE_CHECK_MIN_BUSY_S)
              .values_list("vehicle_id", "vehicle__hardware_id", "precision", "mops", "busy_s", "units"))
    by_class: dict[tuple[int, str], list[float]] = defaultdict(list)
    by_car: dict[int, dict[str, float]] = defaultdict(dict)
    for vehicle_id, hardware_id, precision, mops, busy_s, units in proven:
        rate = rate_proven(row=VehicleRate(mops=mops, busy_s=busy_s, units=units))
        if rate is not None:
            by_class[hardware_id, precision].append(rate)
            by_car[vehicle_id][precision] = rate
    for car in sorted(cars, key=lambda c: c.pk):
        reason = ""
        for precision, rate in sorted(by_car.get(car.pk, {}).items()):
            peers = by_class[car.hardware_id, precision]
            if len(peers) < settings.HARDWARE_CLASS_MIN_CARS:
                continue
            median = _median(peers)
            if rate < settings.HARDWARE_MISMATCH_SHARE * median:
                reason = (f"Registered as {car.hardware.name}, but it delivers {rate:,.0f} Mops/s in "
                          f"{precision.upper()}, under {settings.HARDWARE_MISMATCH_SHARE:.0%} of the {median:,.0f} Mops/s "
                          f"that {car.hardware.code} cars deliver (the median of {len(peers)}). It is sold at what it "
                          f"delivers; check that the right hardware is chosen for it.")[:300]
                break
        if (bool(reason), reason) != (car.hardware_mismatch, car.hardware_mismatch_reason):
            Vehicle.objects.filter(pk=car.pk).update(hardware_mismatch=bool(reason), hardware_mismatch_reason=reason)


# --- a job's units -------------------------------------------------------------------------------------

def units_create(*, job: Job, units) -> None:
    """Save a new job's units, in order, from ``units``: (tokens, mega-ops, documents) each."""
    batch: list[WorkUnit] = []
    for seq, (token_count, mops, docs) in enumerate(units):
        batch.append(WorkUnit(job=job, seq=seq, inputs=docs, tokens=token_count, mops=mops))
        if len(batch) == 500:
            WorkUnit.objects.bulk_create(batch)
            batch = []
    WorkUnit.objects.bulk_create(batch)


def units_data_wipe(*, job_id: int) -> int:
    """Delete the buyer's content that a closed job's units and leases hold: the documents (``inputs``), the
    results (``result``, and a car's result still waiting for its check on its lease row) and the platform's
    reference results. The rows stay, with their counts, states and prices: the meter records and the ledger
    point at them. The job's row is locked by the flow (marketplace.flows.job_data_delete), so no completion
    or arbitration of its units runs meanwhile. Returns how many units were wiped."""
    wiped = WorkUnit.objects.filter(job_id=job_id).update(
        inputs=[], result=None, reference=None, verify=WorkUnit.Verify.NONE, verify_owner=None, verify_since=None)
    Lease.objects.filter(unit__job_id=job_id, result__isnull=False).update(result=None)
    return wiped


def units_stop(*, job_id: int, units: list[tuple[int, str, int | None, int]], reason: str) -> None:
    """A job closes: withdraw its active leases (the cars are told) and cancel its queued units. ``units`` are
    the job's (id, state, car, epoch) rows, locked by the flow (marketplace.flows.locks.job_lock)."""
    by_vehicle: dict[int, list] = defaultdict(list)
    for unit_id, state, vehicle_id, epoch in units:
        if state == WorkUnit.State.LEASED:
            by_vehicle[vehicle_id].append((unit_id, epoch))
    for vehicle_id, refs in by_vehicle.items():
        leases_withdraw(vehicle_id=vehicle_id, reason=reason, notify=True, outcome=Lease.Outcome.CANCELLED, only=refs)
    WorkUnit.objects.filter(job_id=job_id, state=WorkUnit.State.QUEUED).update(state=WorkUnit.State.CANCELLED)
