from decimal import Decimal

from django.conf import settings
from django.db.models import Q, Sum
from django.utils import timezone

from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, MeterRecord, PlatformFee
from billing.money import FEMTO_PER_MAJOR


def account_balance_minor(*, account: LedgerAccount) -> int:
    return account.entries.aggregate(total=Sum("amount_minor"))["total"] or 0


def unbalanced_transaction_ids() -> list[int]:
    """Transactions whose entries do not sum to zero. Always empty; the ledger check in tests and the
    operator's reconciliation use it."""
    return list(
        LedgerEntry.objects.values("transaction_id").annotate(total=Sum("amount_minor"))
        .exclude(total=0).values_list("transaction_id", flat=True)
    )


def job_spend_minor(*, job) -> int:
    """What the buyer has been debited for a job's completed units so far, in minor units (from its balance
    or from the job's reservation; reserving and releasing are not spending)."""
    total = LedgerEntry.objects.filter(
        transaction__job=job, transaction__kind=LedgerTransaction.Kind.USAGE,
        account__kind__in=[LedgerAccount.Kind.BUYER, LedgerAccount.Kind.BUYER_RESERVED],
    ).aggregate(total=Sum("amount_minor"))["total"]
    return -(total or 0)


def owner_earnings_minor(*, owner) -> int:
    total = LedgerEntry.objects.filter(account__kind=LedgerAccount.Kind.OWNER, account__owner=owner).aggregate(
        total=Sum("amount_minor"))["total"]
    return total or 0


#: The meter records whose earnings stand: not clawed back (docs/verification.md). Energy counts for all of them:
#: the car spent it either way.
EARNINGS_STAND = Q(clawback=None)


def owner_earnings_femto(*, owner, currency: str) -> int:
    """The owner's exact share of everything their cars computed (removed cars included), in femto-units.
    The ledger books it in whole minor units, the remainder waiting on the account's carry."""
    return (MeterRecord.objects.filter(EARNINGS_STAND, owner=owner, currency=currency)
            .aggregate(total=Sum("owner_femto"))["total"] or 0)


def owner_net_earnings(*, earned_femto: int, energy_cost: Decimal | None) -> Decimal | None:
    """What an owner keeps of what their cars earned (``earned_femto``, their exact share) once the energy it
    took is paid for (``energy_cost``, from billing.reports.energy_cost), in the major unit, exact; None while
    the owner has set no electricity price."""
    return None if energy_cost is None else Decimal(earned_femto) / FEMTO_PER_MAJOR - energy_cost


def vehicle_earnings_femto(*, vehicle) -> int:
    """The owner's exact share of everything one car computed, in femto-units."""
    return MeterRecord.objects.filter(EARNINGS_STAND, vehicle=vehicle).aggregate(total=Sum("owner_femto"))["total"] or 0


def platform_fee_bps(*, at=None) -> int:
    """The platform fee in force at ``at`` (now by default): the latest operator setting, else the
    ``PLATFORM_FEE_BPS`` setting."""
    fee = PlatformFee.objects.filter(effective_from__lte=at or timezone.now()).order_by("-effective_from", "-pk").first()
    return fee.fee_bps if fee else settings.PLATFORM_FEE_BPS


def buyer_balance_minor(*, organisation, currency: str | None = None,
                        kind: str = LedgerAccount.Kind.BUYER) -> int:
    """An organisation's balance (or, with ``kind=BUYER_RESERVED``, what its open jobs hold reserved), in
    minor units; 0 before its first booking."""
    return LedgerEntry.objects.filter(account__kind=kind, account__organisation=organisation,
                                      account__currency=currency or settings.CURRENCY).aggregate(
        total=Sum("amount_minor"))["total"] or 0
