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
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, MeterRecord, PlatformFee, Reservation
from billing.selectors import account_balance_minor, platform_fee_bps
from billing.money import charge_femto, femto_to_minor_with_carry, split_revenue


@dataclass(frozen=True)
class Posting:
    account: LedgerAccount
    amount_minor: int


def account_get(*, kind: str, currency: str, organisation=None, owner=None) -> LedgerAccount:
    account, _ = LedgerAccount.objects.get_or_create(kind=kind, currency=currency, organisation=organisation, owner=owner)
    return account


@transaction.atomic
def ledger_post(*, kind: str, description: str, currency: str, postings: list[Posting], job=None,
                reference: str | None = None) -> LedgerTransaction:
    if sum(p.amount_minor for p in postings) != 0:
        raise BillingError("ledger transaction does not balance", code="unbalanced",
                           extra={"amounts": [p.amount_minor for p in postings]})
    if any(p.account.currency != currency for p in postings):
        raise BillingError("ledger transaction mixes currencies", code="mixed_currency")
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


def usage_record(*, unit, vehicle, price_micros: int, energy_mwh: int) -> MeterRecord:
    """Meter one completed work unit and book it: the buyer is debited at the clearing price, the owner
    credited their share, the platform its fee; the parties' sub-cent rounding goes to the rounding account.

    Called inside the unit-completion transaction; the unique meter row per unit means no unit is paid twice.
    """
    job = unit.job
    currency = job.currency
    fee_bps = platform_fee_bps()
    charge = charge_femto(mops=unit.mops, price_micros=price_micros)
    owner_share, platform_share = split_revenue(charge=charge, fee_bps=fee_bps)

    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(job=job).first()
        if reservation and reservation.status != Reservation.Status.ACTIVE:
            raise BillingError("The job's reserved budget was released.", code="reservation_released",
                               extra={"job": job.pk})
        # A funded job pays from its reservation; a job without one (before reservations are wired) from
        # the buyer's balance.
        payer_kind = LedgerAccount.Kind.BUYER_RESERVED if reservation else LedgerAccount.Kind.BUYER
        accounts = {
            "buyer": account_get(kind=payer_kind, currency=currency, organisation=job.organisation),
            "owner": account_get(kind=LedgerAccount.Kind.OWNER, currency=currency, owner=vehicle.owner),
            "platform": account_get(kind=LedgerAccount.Kind.PLATFORM_FEE, currency=currency),
            "rounding": account_get(kind=LedgerAccount.Kind.ROUNDING, currency=currency),
        }
        keys = list(accounts)
        accounts = dict(zip(keys, accounts_lock(*accounts.values())))
        buyer = _accrue(accounts["buyer"], charge)
        owner = _accrue(accounts["owner"], owner_share)
        platform = _accrue(accounts["platform"], platform_share)
        if reservation:
            if buyer > reservation.remaining_minor:
                raise BillingError("The job's reserved budget is spent.", code="reservation_exhausted",
                                   extra={"job": job.pk, "remaining_minor": reservation.remaining_minor})
            reservation.drawn_minor += buyer
            reservation.save(update_fields=["drawn_minor", "updated_at"])
        txn = ledger_post(
            kind=LedgerTransaction.Kind.USAGE,
            description=f"Unit {job.pk}/{unit.seq} on {vehicle.name}",
            currency=currency,
            job=job,
            postings=[
                Posting(accounts["buyer"], -buyer),
                Posting(accounts["owner"], owner),
                Posting(accounts["platform"], platform),
                Posting(accounts["rounding"], buyer - owner - platform),
            ],
        )
        return MeterRecord.objects.create(
            unit=unit, job=job, vehicle=vehicle, owner=vehicle.owner, tokens=unit.tokens, mops=unit.mops,
            price_micros=price_micros, currency=currency, fee_bps=fee_bps, charge_femto=charge,
            owner_femto=owner_share, platform_femto=platform_share, energy_mwh=energy_mwh, transaction=txn,
        )


# --- Job budget reservations ------------------------------------------------------------------------------

def reservation_create(*, job, amount_minor: int) -> Reservation:
    """Reserve a job's budget cap from its organisation's balance (buyer -A, buyer_reserved +A). Refused
    when the balance does not cover it; once per job."""
    if amount_minor <= 0:
        raise BillingError("A reservation must be positive.", code="invalid_amount")
    currency = job.currency
    with transaction.atomic():
        if Reservation.objects.filter(job=job).exists():
            raise BillingError("This job already has a reservation.", code="already_reserved")
        buyer, reserved = accounts_lock(
            account_get(kind=LedgerAccount.Kind.BUYER, currency=currency, organisation=job.organisation),
            account_get(kind=LedgerAccount.Kind.BUYER_RESERVED, currency=currency, organisation=job.organisation))
        available = account_balance_minor(account=buyer)
        if amount_minor > available:
            raise BillingError("The balance does not cover the job's budget.", code="insufficient_balance",
                               extra={"balance_minor": available, "needed_minor": amount_minor})
        reservation = Reservation.objects.create(job=job, organisation=job.organisation, currency=currency,
                                                 amount_minor=amount_minor)
        ledger_post(kind=LedgerTransaction.Kind.RESERVATION, currency=currency, job=job,
                    reference=f"reservation:{reservation.pk}", description=f"Budget of job {job.pk} reserved",
                    postings=[Posting(buyer, -amount_minor), Posting(reserved, amount_minor)])
        return reservation


def reservation_remaining_minor(*, job) -> int:
    """What the job may still spend, in minor units (0 without an active reservation). The dispatcher
    leases a unit only while this covers the unit's cost at the job's price cap."""
    reservation = Reservation.objects.filter(job=job, status=Reservation.Status.ACTIVE).first()
    return reservation.remaining_minor if reservation else 0


def reservation_release(*, job) -> Reservation | None:
    """Return what is left of a job's reservation to the balance at once (on completion or cancellation).
    Idempotent."""
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(job=job).first()
        if reservation is None or reservation.status == Reservation.Status.RELEASED:
            return reservation
        rest = reservation.remaining_minor
        buyer, reserved = accounts_lock(
            account_get(kind=LedgerAccount.Kind.BUYER, currency=reservation.currency, organisation=job.organisation),
            account_get(kind=LedgerAccount.Kind.BUYER_RESERVED, currency=reservation.currency,
                        organisation=job.organisation))
        ledger_post(kind=LedgerTransaction.Kind.RELEASE, currency=reservation.currency, job=job,
                    reference=f"reservation:{reservation.pk}:release",
                    description=f"Budget of job {job.pk} released", postings=[Posting(reserved, -rest), Posting(buyer, rest)])
        reservation.released_minor, reservation.status = rest, Reservation.Status.RELEASED
        reservation.save(update_fields=["released_minor", "status", "updated_at"])
        return reservation


def platform_fee_set(*, fee_bps: int, effective_from=None, note: str = "", user=None):
    """Set the platform fee from ``effective_from`` (now by default). The history is kept: rows are never
    changed, and each meter record stores the fee it was booked with."""
    if not 0 <= fee_bps <= 10_000:
        raise BillingError("The fee is between 0 and 10000 basis points.", code="invalid_fee")
    return PlatformFee.objects.create(fee_bps=fee_bps, effective_from=effective_from or timezone.now(),
                                      note=note[:200], created_by=user)
