"""Everything that writes money. The ledger is written only through :func:`ledger_post`, which refuses a
transaction that does not balance to zero in one currency."""

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing.errors import BillingError
from billing.models import (
    Clawback,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    MeterRecord,
    PlatformFee,
    Reservation,
)
from billing.money import charge_femto, femto_to_minor_ceil, femto_to_minor_with_carry, format_minor, split_revenue
from billing.selectors import account_balance_minor, platform_fee_bps
from marketplace.models import Job


@dataclass(frozen=True)
class Posting:
    account: LedgerAccount
    amount_minor: int


def account_get(*, kind: str, currency: str, organisation=None, owner=None) -> LedgerAccount:
    account, _ = LedgerAccount.objects.get_or_create(kind=kind, currency=currency, organisation=organisation, owner=owner)
    return account


def ledger_post(*, kind: str, description: str, currency: str, postings: list[Posting], job=None,
                reference: str | None = None) -> LedgerTransaction:
    if sum(p.amount_minor for p in postings) != 0:
        raise BillingError("ledger transaction does not balance", code="unbalanced",
                           extra={"amounts": [p.amount_minor for p in postings]})
    if any(p.account.currency != currency for p in postings):
        raise BillingError("ledger transaction mixes currencies", code="mixed_currency")
    with transaction.atomic(savepoint=False):  # inside a flow's transaction: all or nothing with it
        txn = LedgerTransaction.objects.create(kind=kind, description=description, currency=currency, job=job,
                                               reference=reference)
        LedgerEntry.objects.bulk_create(
            LedgerEntry(transaction=txn, account=p.account, amount_minor=p.amount_minor, currency=currency)
            for p in postings if p.amount_minor
        )
    return txn


def accounts_lock(*accounts: LedgerAccount) -> list[LedgerAccount]:
    """Lock ledger accounts in id order (so concurrent writers never deadlock); return them refreshed, in
    the order given."""
    locked = {a.pk: a for a in LedgerAccount.objects.select_for_update().filter(
        pk__in=[a.pk for a in accounts]).order_by("pk")}
    return [locked[a.pk] for a in accounts]


class AlreadyClaimed(BillingError):
    code = "in_progress"


@contextmanager
def stripe_claim(row):
    """Claim ``row`` (a model with ``claimed_until``) while this worker talks to Stripe about it, so two
    workers never send the same request at once (the local peer would not de-duplicate them). A claim
    expires after twice the Stripe timeout, so a crashed worker blocks nobody for long. Raises
    :class:`AlreadyClaimed` if another worker holds it."""
    now = timezone.now()
    until = now + timedelta(seconds=2 * settings.STRIPE_TIMEOUT_S + 5)
    claimed = type(row).objects.filter(pk=row.pk).filter(
        Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)).update(claimed_until=until)
    if not claimed:
        raise AlreadyClaimed("Another worker is talking to Stripe about this right now.",
                             extra={"model": type(row).__name__, "id": row.pk})
    try:
        yield
    finally:
        type(row).objects.filter(pk=row.pk, claimed_until=until).update(claimed_until=None)


def _accrue(account: LedgerAccount, femto: int) -> int:
    """Move ``femto`` through the account's carry; return the whole minor units to book."""
    minor, account.carry_femto = femto_to_minor_with_carry(femto=femto, carry=account.carry_femto,
                                                           currency=account.currency)
    account.save(update_fields=["carry_femto"])
    return minor


def usage_record(*, unit, vehicle, price_micros: int, energy_mwh: int, duration_ms: int = 0,
                 reservation: Reservation | None = None, epoch: int | None = None) -> MeterRecord:
    """Meter one completed work unit and book it: the job's reservation is drawn at the clearing price, the
    owner credited their share, the platform its fee.

    The reservation is drawn the round-up to whole minor units of the job's exact charge so far (so a job
    pays its exact cost rounded up once, never a cent per unit); the owner's and the platform's sub-cent
    remainders wait on their accounts' carry; what rounding leaves over goes to the rounding account.
    Called inside the unit-completion transaction (marketplace.flows.unit_complete), which may pass the job's
    ``reservation`` already locked; ``epoch`` names the lease paid (the unit's current one by default): the
    unique meter row per lease means no result is paid twice.
    """
    job = unit.job
    currency = job.currency
    fee_bps = platform_fee_bps()
    charge = charge_femto(mops=unit.mops, price_micros=price_micros)
    owner_share, platform_share = split_revenue(charge=charge, fee_bps=fee_bps)

    with transaction.atomic():
        if reservation is None:
            reservation = Reservation.objects.select_for_update().filter(job=job).first()
        if reservation is None:
            raise BillingError("The job has no reserved budget.", code="not_funded", extra={"job": job.pk})
        if reservation.status != Reservation.Status.ACTIVE:
            raise BillingError("The job's reserved budget was released.", code="reservation_released",
                               extra={"job": job.pk})
        charged = reservation.charged_femto + charge
        draw = femto_to_minor_ceil(femto=charged, currency=currency) - reservation.drawn_minor
        if draw > reservation.remaining_minor:
            raise BillingError("The job's reserved budget is spent.", code="reservation_exhausted",
                               extra={"job": job.pk, "remaining_minor": reservation.remaining_minor})
        reserved, owner_account, platform_account, rounding = accounts_lock(
            account_get(kind=LedgerAccount.Kind.BUYER_RESERVED, currency=currency, organisation=job.organisation),
            account_get(kind=LedgerAccount.Kind.OWNER, currency=currency, owner=vehicle.owner),
            account_get(kind=LedgerAccount.Kind.PLATFORM_FEE, currency=currency),
            account_get(kind=LedgerAccount.Kind.ROUNDING, currency=currency))
        owner = _accrue(owner_account, owner_share)
        platform = _accrue(platform_account, platform_share)
        reservation.charged_femto, reservation.drawn_minor = charged, reservation.drawn_minor + draw
        reservation.save(update_fields=["charged_femto", "drawn_minor", "updated_at"])
        txn = ledger_post(
            kind=LedgerTransaction.Kind.USAGE,
            description=f"Unit {job.pk}/{unit.seq} on {vehicle.name}",
            currency=currency,
            job=job,
            postings=[
                Posting(reserved, -draw),
                Posting(owner_account, owner),
                Posting(platform_account, platform),
                Posting(rounding, draw - owner - platform),
            ],
        )
        return MeterRecord.objects.create(
            unit=unit, epoch=unit.lease_epoch if epoch is None else epoch, job=job, vehicle=vehicle,
            owner=vehicle.owner, tokens=unit.tokens, mops=unit.mops, price_micros=price_micros, currency=currency,
            fee_bps=fee_bps, charge_femto=charge, owner_femto=owner_share, platform_femto=platform_share,
            energy_mwh=energy_mwh, duration_ms=duration_ms, transaction=txn,
        )


def check_record(*, unit, vehicle, epoch: int, price_micros: int, energy_mwh: int, duration_ms: int = 0) -> MeterRecord:
    """Meter and pay a check: a second car's computation of a replicated unit (docs/verification.md). The buyer
    pays nothing for it; the platform pays the car what its share of the unit would be, from its fee revenue."""
    job = unit.job
    currency = job.currency
    fee_bps = platform_fee_bps()
    pay, _ = split_revenue(charge=charge_femto(mops=unit.mops, price_micros=price_micros), fee_bps=fee_bps)
    with transaction.atomic():
        owner_account, platform_account, rounding = accounts_lock(
            account_get(kind=LedgerAccount.Kind.OWNER, currency=currency, owner=vehicle.owner),
            account_get(kind=LedgerAccount.Kind.PLATFORM_FEE, currency=currency),
            account_get(kind=LedgerAccount.Kind.ROUNDING, currency=currency))
        owner, platform = _accrue(owner_account, pay), _accrue(platform_account, -pay)
        txn = ledger_post(kind=LedgerTransaction.Kind.VERIFICATION, currency=currency, job=job,
                          description=f"Check of unit {job.pk}/{unit.seq}",
                          postings=[Posting(owner_account, owner), Posting(platform_account, platform),
                                    Posting(rounding, -owner - platform)])
        return MeterRecord.objects.create(
            unit=unit, epoch=epoch, role=MeterRecord.Role.CHECK, job=job, vehicle=vehicle, owner=vehicle.owner,
            tokens=unit.tokens, mops=unit.mops, price_micros=price_micros, currency=currency, fee_bps=fee_bps,
            charge_femto=0, owner_femto=pay, platform_femto=-pay, energy_mwh=energy_mwh, duration_ms=duration_ms,
            transaction=txn)


def clawback(*, unit, epoch: int, reason: str, reservation: Reservation | None = None) -> Clawback | None:
    """Take back what a result was paid (its car was caught before the result was checked): the owner's and
    the platform's shares, through their carries, go back to the buyer: into the job's reservation while it is
    active (``reservation``, locked by the flow; the unit will be paid again when it is recomputed), else to the
    organisation's balance. What rounding leaves over is the rounding account's. An owner already paid out goes
    below zero, and later earnings make it good (docs/verification.md). Once per result; None if it was never
    paid."""
    meter = MeterRecord.objects.filter(unit=unit, epoch=epoch, role=MeterRecord.Role.BUYER, clawback=None).first()
    if meter is None:
        return None
    job = unit.job
    currency = meter.currency
    with transaction.atomic():
        active = reservation is not None and reservation.status == Reservation.Status.ACTIVE
        buyer_kind = LedgerAccount.Kind.BUYER_RESERVED if active else LedgerAccount.Kind.BUYER
        buyer, owner_account, platform_account, rounding = accounts_lock(
            account_get(kind=buyer_kind, currency=currency, organisation=job.organisation),
            account_get(kind=LedgerAccount.Kind.OWNER, currency=currency, owner=meter.owner),
            account_get(kind=LedgerAccount.Kind.PLATFORM_FEE, currency=currency),
            account_get(kind=LedgerAccount.Kind.ROUNDING, currency=currency))
        owner, platform = _accrue(owner_account, -meter.owner_femto), _accrue(platform_account, -meter.platform_femto)
        if active:
            reservation.charged_femto -= meter.charge_femto
            drawn = femto_to_minor_ceil(femto=reservation.charged_femto, currency=currency)
            back, reservation.drawn_minor = reservation.drawn_minor - drawn, drawn
            reservation.save(update_fields=["charged_femto", "drawn_minor", "updated_at"])
        else:
            back = -owner - platform
        txn = ledger_post(kind=LedgerTransaction.Kind.CLAWBACK, currency=currency, job=job,
                          reference=f"clawback:{meter.pk}", description=f"Unit {job.pk}/{unit.seq} voided: {reason}"[:200],
                          postings=[Posting(buyer, back), Posting(owner_account, owner),
                                    Posting(platform_account, platform), Posting(rounding, -back - owner - platform)])
        return Clawback.objects.create(meter=meter, transaction=txn, reason=reason[:64])


def undelivered_credit(*, job, femto: int, reference: str, description: str) -> LedgerTransaction | None:
    """Give a buyer back what a closed job was charged for work it could not deliver: the finished documents of
    a batch request left unfinished when its batch expired or was cancelled (docs/api.md). The owners keep their
    pay (they did the work); the platform pays it from its fee revenue. The job paid its exact cost rounded up
    once; with this credit it pays its exact cost less ``femto``, rounded up once. Once per ``reference``; None
    when there is nothing to give back."""
    with transaction.atomic():
        if LedgerTransaction.objects.filter(reference=reference).exists():
            return None
        reservation = Reservation.objects.filter(job=job).first()
        if reservation is None or femto <= 0:
            return None
        femto = min(femto, reservation.charged_femto)
        amount = reservation.drawn_minor - femto_to_minor_ceil(femto=reservation.charged_femto - femto,
                                                               currency=job.currency)
        if amount <= 0:
            return None
        buyer, platform = accounts_lock(
            account_get(kind=LedgerAccount.Kind.BUYER, currency=job.currency, organisation=job.organisation),
            account_get(kind=LedgerAccount.Kind.PLATFORM_FEE, currency=job.currency))
        return ledger_post(kind=LedgerTransaction.Kind.UNDELIVERED, currency=job.currency, job=job,
                           reference=reference, description=description[:200],
                           postings=[Posting(buyer, amount), Posting(platform, -amount)])


# --- Job budget reservations ------------------------------------------------------------------------------

class InsufficientBalance(BillingError):
    code = "insufficient_balance"
    status = 402


def _reserve_more(*, reservation: Reservation, amount_minor: int, reference: str, description: str) -> None:
    """Move ``amount_minor`` (> 0) from the organisation's balance into the reservation, or refuse."""
    buyer, reserved = accounts_lock(
        account_get(kind=LedgerAccount.Kind.BUYER, currency=reservation.currency, organisation=reservation.organisation),
        account_get(kind=LedgerAccount.Kind.BUYER_RESERVED, currency=reservation.currency,
                    organisation=reservation.organisation))
    available = account_balance_minor(account=buyer)
    if amount_minor > available:
        raise InsufficientBalance(
            f"The balance of {format_minor(available, reservation.currency)} does not cover the "
            f"{format_minor(amount_minor, reservation.currency)} this job needs reserved. Top up the balance, "
            f"or set a lower budget cap.", extra={"balance_minor": available, "needed_minor": amount_minor})
    ledger_post(kind=LedgerTransaction.Kind.RESERVATION, currency=reservation.currency, job=reservation.job,
                reference=reference, description=description,
                postings=[Posting(buyer, -amount_minor), Posting(reserved, amount_minor)])


def _reserve_less(*, reservation: Reservation, amount_minor: int, reference: str, description: str) -> None:
    """Return ``amount_minor`` (> 0, at most what remains) of the reservation to the organisation's balance."""
    buyer, reserved = accounts_lock(
        account_get(kind=LedgerAccount.Kind.BUYER, currency=reservation.currency, organisation=reservation.organisation),
        account_get(kind=LedgerAccount.Kind.BUYER_RESERVED, currency=reservation.currency,
                    organisation=reservation.organisation))
    ledger_post(kind=LedgerTransaction.Kind.RELEASE, currency=reservation.currency, job=reservation.job,
                reference=reference, description=description,
                postings=[Posting(reserved, -amount_minor), Posting(buyer, amount_minor)])


def reservation_create(*, job, amount_minor: int) -> Reservation:
    """Reserve a job's budget from its organisation's balance (buyer -A, buyer_reserved +A). Refused with
    :class:`InsufficientBalance` when the balance does not cover it; once per job."""
    if amount_minor <= 0:
        raise BillingError("A reservation must be positive.", code="invalid_amount")
    with transaction.atomic():
        if Reservation.objects.filter(job=job).exists():
            raise BillingError("This job already has a reservation.", code="already_reserved")
        reservation = Reservation.objects.create(job=job, organisation=job.organisation, currency=job.currency,
                                                 amount_minor=amount_minor)
        _reserve_more(reservation=reservation, amount_minor=amount_minor, reference=f"reservation:{reservation.pk}",
                      description=f"Budget of job {job.pk} reserved")
        return reservation


def reservation_resize(*, job, amount_minor: int) -> Reservation:
    """Make an active reservation hold ``amount_minor`` in all (drawn included): more is taken from the
    balance (or refused with :class:`InsufficientBalance`), less returned to it at once. Never below what
    was drawn. Called when a buyer changes an open job's bid or budget cap."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().get(job=job)
        if reservation.status != Reservation.Status.ACTIVE:
            raise BillingError("The job's reserved budget was released.", code="reservation_released",
                               extra={"job": job.pk})
        amount_minor = max(amount_minor, reservation.drawn_minor + reservation.released_minor)
        change = amount_minor - reservation.amount_minor
        if not change:
            return reservation
        step = LedgerTransaction.objects.filter(job=job, kind__in=[LedgerTransaction.Kind.RESERVATION,
                                                                   LedgerTransaction.Kind.RELEASE]).count()
        reference = f"reservation:{reservation.pk}:resize:{step}"
        if change > 0:
            _reserve_more(reservation=reservation, amount_minor=change, reference=reference,
                          description=f"Budget of job {job.pk} raised")
        else:
            _reserve_less(reservation=reservation, amount_minor=-change, reference=reference,
                          description=f"Budget of job {job.pk} lowered")
        reservation.amount_minor = amount_minor
        reservation.save(update_fields=["amount_minor", "updated_at"])
        return reservation


def reservation_remaining_minor(*, job) -> int:
    """What the job may still spend, in minor units (0 without an active reservation)."""
    reservation = Reservation.objects.filter(job=job, status=Reservation.Status.ACTIVE).first()
    return reservation.remaining_minor if reservation else 0


def reservation_release(*, job) -> Reservation | None:
    """Return what is left of a job's reservation to the balance at once (on completion, cancellation or
    expiry). Idempotent."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(job=job).first()
        if reservation is None or reservation.status == Reservation.Status.RELEASED:
            return reservation
        rest = reservation.remaining_minor
        if rest:
            _reserve_less(reservation=reservation, amount_minor=rest, reference=f"reservation:{reservation.pk}:release",
                          description=f"Budget of job {job.pk} released")
        reservation.released_minor += rest
        reservation.status = Reservation.Status.RELEASED
        reservation.save(update_fields=["released_minor", "status", "updated_at"])
        return reservation


def reservations_release_finished() -> int:
    """Release the reservations of jobs that have finished but still hold one (a crash between a job's
    closing and its release); the auction tick runs it. Returns how many were released."""
    stuck = list(Reservation.objects.filter(status=Reservation.Status.ACTIVE)
                 .exclude(job__state__in=Job.OPEN_STATES).select_related("job"))
    for reservation in stuck:
        reservation_release(job=reservation.job)
    return len(stuck)


def balance_grant(*, organisation, amount_minor: int, note: str, by=None, reference: str | None = None,
                  currency: str | None = None) -> LedgerTransaction:
    """Credit an organisation's balance from the platform (a goodwill or trial credit, booked against the
    platform's grants account; no money moves at Stripe). ``reference`` makes a grant happen once."""
    if amount_minor <= 0:
        raise BillingError("A grant must be positive.", code="invalid_amount")
    currency = currency or settings.CURRENCY
    with transaction.atomic():
        if reference and (done := LedgerTransaction.objects.filter(reference=reference).first()):
            return done
        grants, buyer = accounts_lock(account_get(kind=LedgerAccount.Kind.PLATFORM_GRANTS, currency=currency),
                                      account_get(kind=LedgerAccount.Kind.BUYER, currency=currency,
                                                  organisation=organisation))
        by_whom = f" by {by}" if by else ""
        return ledger_post(kind=LedgerTransaction.Kind.GRANT, currency=currency, reference=reference,
                           description=f"Credit granted{by_whom}: {note}"[:200],
                           postings=[Posting(grants, -amount_minor), Posting(buyer, amount_minor)])


def platform_fee_set(*, fee_bps: int, effective_from=None, note: str = "", user=None):
    """Set the platform fee from ``effective_from`` (now by default). The history is kept: rows are never
    changed, and each meter record stores the fee it was booked with."""
    if not 0 <= fee_bps <= 10_000:
        raise BillingError("The fee is between 0 and 10000 basis points.", code="invalid_fee")
    return PlatformFee.objects.create(fee_bps=fee_bps, effective_from=effective_from or timezone.now(),
                                      note=note[:200], created_by=user)


def owner_electricity_price_set(*, owner, micros_per_kwh: int | None) -> None:
    """Keep (or clear, with None) what an owner's electricity costs, for their earnings page's estimate."""
    if micros_per_kwh is not None and micros_per_kwh < 0:
        raise BillingError("An electricity price is zero or more.", code="invalid_amount")
    owner.electricity_price_micros_per_kwh = micros_per_kwh
    owner.save(update_fields=["electricity_price_micros_per_kwh"])
