"""The double-entry ledger and metering. Entries are append-only; every transaction balances to zero in
one currency. Amounts are integers in minor units; see billing.money for the rules."""

from django.conf import settings
from django.db import models


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise TypeError(f"{self.model.__name__} rows are append-only")

    def delete(self):
        raise TypeError(f"{self.model.__name__} rows are append-only")


class AppendOnlyModel(models.Model):
    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise TypeError(f"{type(self).__name__} rows are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} rows are append-only")


class LedgerAccount(models.Model):
    class Kind(models.TextChoices):
        BUYER = "buyer", "Buyer (organisation)"
        OWNER = "owner", "Car owner"
        PLATFORM_FEE = "platform_fee", "Platform fee revenue"
        ROUNDING = "rounding", "Rounding"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    organisation = models.ForeignKey("marketplace.Organisation", null=True, blank=True, on_delete=models.PROTECT)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT)
    currency = models.CharField(max_length=3)
    carry_femto = models.BigIntegerField(
        default=0, help_text="Sub-minor remainder not yet booked, in femto-units; always below one minor unit."
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["kind", "organisation", "currency"], name="one_account_per_organisation",
                                    condition=models.Q(organisation__isnull=False)),
            models.UniqueConstraint(fields=["kind", "owner", "currency"], name="one_account_per_owner",
                                    condition=models.Q(owner__isnull=False)),
            models.UniqueConstraint(fields=["kind", "currency"], name="one_platform_account",
                                    condition=models.Q(organisation__isnull=True, owner__isnull=True)),
        ]

    def __str__(self):
        party = self.organisation or self.owner or "platform"
        return f"{self.get_kind_display()}: {party} ({self.currency})"


class LedgerTransaction(AppendOnlyModel):
    class Kind(models.TextChoices):
        USAGE = "usage", "Metered usage"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    description = models.CharField(max_length=200)
    job = models.ForeignKey("marketplace.Job", null=True, blank=True, on_delete=models.PROTECT)
    currency = models.CharField(max_length=3)

    def __str__(self):
        return f"#{self.pk} {self.description}"


class LedgerEntry(AppendOnlyModel):
    transaction = models.ForeignKey(LedgerTransaction, on_delete=models.PROTECT, related_name="entries")
    account = models.ForeignKey(LedgerAccount, on_delete=models.PROTECT, related_name="entries")
    amount_minor = models.BigIntegerField(help_text="Minor units; positive credits the account, negative debits it.")
    currency = models.CharField(max_length=3)

    class Meta:
        verbose_name_plural = "ledger entries"


class MeterRecord(AppendOnlyModel):
    """One completed work unit, priced exactly. One per unit (unique), so no unit is paid twice."""

    unit = models.OneToOneField("fleet.WorkUnit", on_delete=models.PROTECT, related_name="meter")
    job = models.ForeignKey("marketplace.Job", on_delete=models.PROTECT, related_name="meter_records")
    vehicle = models.ForeignKey("fleet.Vehicle", on_delete=models.PROTECT, related_name="meter_records")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="meter_records")
    tokens = models.PositiveIntegerField()
    mops = models.PositiveBigIntegerField()
    price_micros = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3)
    fee_bps = models.PositiveIntegerField()
    charge_femto = models.BigIntegerField()
    owner_femto = models.BigIntegerField()
    platform_femto = models.BigIntegerField()
    energy_mwh = models.PositiveBigIntegerField(help_text="Energy drawn from the car's battery, milliwatt-hours.")
    transaction = models.OneToOneField(LedgerTransaction, on_delete=models.PROTECT, related_name="meter")
    created_at = models.DateTimeField(auto_now_add=True)
