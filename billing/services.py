"""Everything that writes money. The ledger is written only through :func:`ledger_post`, which refuses a
transaction that does not balance to zero in one currency."""

from dataclasses import dataclass

from django.conf import settings
from django.db import transaction

from billing.errors import BillingError
from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, MeterRecord
from billing.money import charge_femto, femto_to_minor_with_carry, split_revenue


@dataclass(frozen=True)
class Posting:
    account: LedgerAccount
    amount_minor: int


def account_get(*, kind: str, currency: str, organisation=None, owner=None) -> LedgerAccount:
    account, _ = LedgerAccount.objects.get_or_create(kind=kind, currency=currency, organisation=organisation, owner=owner)
    return account


@transaction.atomic
def ledger_post(*, kind: str, description: str, currency: str, postings: list[Posting], job=None) -> LedgerTransaction:
    if sum(p.amount_minor for p in postings) != 0:
        raise BillingError("ledger transaction does not balance", code="unbalanced",
                           extra={"amounts": [p.amount_minor for p in postings]})
    if any(p.account.currency != currency for p in postings):
        raise BillingError("ledger transaction mixes currencies", code="mixed_currency")
    txn = LedgerTransaction.objects.create(kind=kind, description=description, currency=currency, job=job)
    LedgerEntry.objects.bulk_create(
        LedgerEntry(transaction=txn, account=p.account, amount_minor=p.amount_minor, currency=currency)
        for p in postings if p.amount_minor
    )
    return txn


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
    fee_bps = settings.PLATFORM_FEE_BPS
    charge = charge_femto(mops=unit.mops, price_micros=price_micros)
    owner_share, platform_share = split_revenue(charge=charge, fee_bps=fee_bps)

    with transaction.atomic():
        accounts = {
            "buyer": account_get(kind=LedgerAccount.Kind.BUYER, currency=currency, organisation=job.organisation),
            "owner": account_get(kind=LedgerAccount.Kind.OWNER, currency=currency, owner=vehicle.owner),
            "platform": account_get(kind=LedgerAccount.Kind.PLATFORM_FEE, currency=currency),
            "rounding": account_get(kind=LedgerAccount.Kind.ROUNDING, currency=currency),
        }
        # Lock in id order so concurrent completions never deadlock.
        locked = {a.pk: a for a in LedgerAccount.objects.select_for_update().filter(
            pk__in=[a.pk for a in accounts.values()]).order_by("pk")}
        accounts = {k: locked[a.pk] for k, a in accounts.items()}
        buyer = _accrue(accounts["buyer"], charge)
        owner = _accrue(accounts["owner"], owner_share)
        platform = _accrue(accounts["platform"], platform_share)
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
