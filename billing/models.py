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
        BUYER_RESERVED = "buyer_reserved", "Buyer reservations (jobs' budgets)"
        OWNER = "owner", "Car owner"
        PLATFORM_FEE = "platform_fee", "Platform fee revenue"
        ROUNDING = "rounding", "Rounding"
        STRIPE_CLEARING = "stripe_clearing", "Stripe clearing (money held at Stripe)"
        STRIPE_FEES = "stripe_fees", "Stripe fees"
        DISPUTE_LOSSES = "dispute_losses", "Dispute losses"
        PLATFORM_GRANTS = "platform_grants", "Credits granted by the platform"

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
        TOP_UP = "top_up", "Balance top-up"
        RESERVATION = "reservation", "Job budget reserved"
        RELEASE = "release", "Job budget released"
        REFUND = "refund", "Top-up refund"
        REFUND_REVERSAL = "refund_reversal", "Refund undone (Stripe refused it)"
        DISPUTE = "dispute", "Card dispute"
        PAYOUT = "payout", "Owner payout"
        PAYOUT_REVERSAL = "payout_reversal", "Owner payout reversed"
        GRANT = "grant", "Credit granted by the platform"
        VERIFICATION = "verification", "Result check paid by the platform"
        CLAWBACK = "clawback", "Earnings of a wrong or voided result taken back"
        UNDELIVERED = "undelivered", "Work not delivered credited back"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    reference = models.CharField(
        max_length=100, unique=True, null=True, blank=True,
        help_text="What this transaction books, e.g. 'top_up:12'; unique, so nothing is booked twice.")
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
    """One accepted result of a work unit, priced exactly: one per lease (unit and epoch, unique), so no lease is
    paid twice. ``role`` says who pays: the buyer for the unit's result, the platform for a check (a second
    car's computation of a replicated unit: ``charge_femto`` 0, the platform's share the negative of the car's).
    A result voided later keeps its row; its Clawback takes the money back."""

    class Role(models.TextChoices):
        BUYER = "buyer", "The unit's result, paid by the buyer"
        CHECK = "check", "A check of the unit, paid by the platform"

    unit = models.ForeignKey("fleet.WorkUnit", on_delete=models.PROTECT, related_name="meters")
    epoch = models.PositiveIntegerField(default=0, help_text="The lease whose result this pays.")
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.BUYER)
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
    duration_ms = models.PositiveBigIntegerField(default=0, help_text="From the lease to the accepted result.")
    transaction = models.OneToOneField(LedgerTransaction, on_delete=models.PROTECT, related_name="meter")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(charge_femto=models.F("owner_femto") + models.F("platform_femto")),
                                   name="meter_shares_add_up_to_the_charge"),
            models.UniqueConstraint(fields=["unit", "epoch"], name="one_meter_per_lease"),
        ]


class Clawback(AppendOnlyModel):
    """The earnings of one metered result taken back, because the result was wrong or its car was caught
    before it was checked (docs/verification.md): the owner's and the platform's shares go back to the buyer."""

    meter = models.OneToOneField(MeterRecord, on_delete=models.PROTECT, related_name="clawback")
    transaction = models.ForeignKey(LedgerTransaction, on_delete=models.PROTECT, related_name="clawbacks")
    reason = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)


class PlatformFee(AppendOnlyModel):
    """The platform's fee as operators set it, with its history: the row with the latest ``effective_from``
    not in the future applies. Without any row, ``settings.PLATFORM_FEE_BPS`` (default 1500 = 15 %)."""

    fee_bps = models.PositiveIntegerField(help_text="Basis points of each unit's charge: 1500 = 15.00 %.")
    effective_from = models.DateTimeField(db_index=True)
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(fee_bps__lte=10_000), name="fee_at_most_100_percent")]

    def __str__(self):
        return f"{self.fee_bps / 100:.2f} % from {self.effective_from:%Y-%m-%d %H:%M}"


class AutoTopUp(models.Model):
    """A buyer's standing order: when the balance falls under the threshold, top up by the amount with the
    saved card (off session)."""

    organisation = models.OneToOneField("marketplace.Organisation", on_delete=models.PROTECT,
                                        related_name="auto_top_up")
    card = models.ForeignKey("billing.SavedCard", on_delete=models.PROTECT)
    threshold_minor = models.PositiveBigIntegerField()
    amount_minor = models.PositiveBigIntegerField()
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)


class Reservation(models.Model):
    """A job's budget cap, moved from the buyer's balance to the reserved account when the job is funded.
    Completed units draw from it (in :func:`billing.services.usage_record`); release returns the rest."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        RELEASED = "released", "Released"

    job = models.OneToOneField("marketplace.Job", on_delete=models.PROTECT, related_name="reservation")
    organisation = models.ForeignKey("marketplace.Organisation", on_delete=models.PROTECT, related_name="reservations")
    currency = models.CharField(max_length=3)
    amount_minor = models.PositiveBigIntegerField(help_text="Reserved, minor units.")
    drawn_minor = models.PositiveBigIntegerField(default=0, help_text="Drawn by completed units, minor units.")
    charged_femto = models.PositiveBigIntegerField(
        default=0, help_text="The exact charge of the job's completed units, femto-units; drawn_minor is its "
                             "round-up to whole minor units.")
    released_minor = models.PositiveBigIntegerField(default=0, help_text="Returned to the balance, minor units.")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.CheckConstraint(
            condition=models.Q(amount_minor__gte=models.F("drawn_minor") + models.F("released_minor")),
            name="reservation_draws_and_releases_at_most_its_amount")]

    @property
    def remaining_minor(self) -> int:
        return self.amount_minor - self.drawn_minor - self.released_minor


# --- Stripe --------------------------------------------------------------------------------------------


class StripeRequest(models.Model):
    """One request to Stripe that moves money (or creates what later moves it), stored with its
    deterministic idempotency key *before* the call, and its outcome after. A key that succeeded is never
    sent again: :mod:`billing.stripe_api` answers from this row."""

    class Status(models.TextChoices):
        PENDING = "pending", "Sent, outcome unknown"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Refused by Stripe"

    key = models.CharField(max_length=200, unique=True)
    purpose = models.CharField(max_length=40)
    params = models.JSONField(default=dict)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    stripe_id = models.CharField(max_length=100, blank=True)
    response = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self):
        return f"{self.key} ({self.status})"


class StripeCustomer(models.Model):
    organisation = models.OneToOneField("marketplace.Organisation", on_delete=models.PROTECT,
                                        related_name="stripe_customer")
    stripe_id = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)


class SavedCard(models.Model):
    organisation = models.ForeignKey("marketplace.Organisation", on_delete=models.PROTECT, related_name="saved_cards")
    stripe_payment_method_id = models.CharField(max_length=100, unique=True)
    setup_intent_id = models.CharField(max_length=100, blank=True)
    brand = models.CharField(max_length=20, blank=True)
    last4 = models.CharField(max_length=4, blank=True)
    exp_month = models.PositiveSmallIntegerField(null=True)
    exp_year = models.PositiveSmallIntegerField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)


class TopUp(models.Model):
    """A buyer's card payment into their balance (a Stripe PaymentIntent)."""

    class Status(models.TextChoices):
        CREATED = "created", "Created"
        REQUIRES_ACTION = "requires_action", "Needs the buyer's authentication"
        SUCCEEDED = "succeeded", "Paid"
        FAILED = "failed", "Failed"

    organisation = models.ForeignKey("marketplace.Organisation", on_delete=models.PROTECT, related_name="top_ups")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    amount_minor = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3)
    payment_method_id = models.CharField(max_length=100)
    payment_intent_id = models.CharField(max_length=100, unique=True, null=True, blank=True)
    charge_id = models.CharField(max_length=100, blank=True, db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.CREATED)
    failure_message = models.CharField(max_length=200, blank=True)
    fee_minor = models.PositiveBigIntegerField(default=0, help_text="Stripe's fee, minor units.")
    refunded_minor = models.PositiveBigIntegerField(default=0)
    disputed_minor = models.PositiveBigIntegerField(default=0)
    claimed_until = models.DateTimeField(
        null=True, blank=True, help_text="A worker is talking to Stripe about this row until then; others wait.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    @property
    def refundable_minor(self) -> int:
        if self.status != self.Status.SUCCEEDED:
            return 0
        return self.amount_minor - self.refunded_minor - self.disputed_minor


class Refund(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SUCCEEDED = "succeeded", "Refunded"
        FAILED = "failed", "Failed"

    top_up = models.ForeignKey(TopUp, on_delete=models.PROTECT, related_name="refunds")
    amount_minor = models.PositiveBigIntegerField()
    reason = models.CharField(max_length=200, blank=True)
    stripe_refund_id = models.CharField(max_length=100, unique=True, null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    claimed_until = models.DateTimeField(
        null=True, blank=True, help_text="A worker is talking to Stripe about this row until then; others wait.")
    created_at = models.DateTimeField(auto_now_add=True)


class Dispute(models.Model):
    stripe_dispute_id = models.CharField(max_length=100, unique=True)
    top_up = models.ForeignKey(TopUp, on_delete=models.PROTECT, related_name="disputes")
    amount_minor = models.PositiveBigIntegerField()
    from_balance_minor = models.PositiveBigIntegerField(help_text="Taken back from the buyer's balance.")
    loss_minor = models.PositiveBigIntegerField(help_text="What the balance could not cover: a platform loss.")
    reason = models.CharField(max_length=60, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)


class ConnectedAccount(models.Model):
    """An owner's Stripe Connect Express account."""

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="connected_account")
    stripe_account_id = models.CharField(max_length=100, unique=True)
    details_submitted = models.BooleanField(default=False)
    payouts_enabled = models.BooleanField(default=False)
    transfers_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    @property
    def can_receive_transfers(self) -> bool:
        return self.transfers_active and self.details_submitted


class SettlementRun(models.Model):
    """One periodic settlement: every payable owner paid by one Transfer, all in one transfer_group."""

    key = models.CharField(max_length=20, unique=True, help_text="The ISO week, e.g. 2026-W48.")
    currency = models.CharField(max_length=3)
    transfer_group = models.CharField(max_length=60, unique=True)
    holdback_days = models.PositiveIntegerField()
    min_payout_minor = models.PositiveBigIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.transfer_group


class Payout(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed (booked back)"

    run = models.ForeignKey(SettlementRun, on_delete=models.PROTECT, related_name="payouts")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="payouts")
    account = models.ForeignKey(ConnectedAccount, on_delete=models.PROTECT, related_name="payouts")
    amount_minor = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    transfer_id = models.CharField(max_length=100, unique=True, null=True, blank=True)
    reversed_minor = models.PositiveBigIntegerField(default=0)
    failure_message = models.CharField(max_length=200, blank=True)
    claimed_until = models.DateTimeField(
        null=True, blank=True, help_text="A worker is talking to Stripe about this row until then; others wait.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "owner"], name="one_payout_per_owner_per_run")]


class PayoutReversal(models.Model):
    payout = models.ForeignKey(Payout, on_delete=models.PROTECT, related_name="reversals")
    amount_minor = models.PositiveBigIntegerField()
    reason = models.CharField(max_length=200, blank=True)
    stripe_reversal_id = models.CharField(max_length=100, unique=True, null=True, blank=True)
    claimed_until = models.DateTimeField(
        null=True, blank=True, help_text="A worker is talking to Stripe about this row until then; others wait.")
    created_at = models.DateTimeField(auto_now_add=True)


class StripeEvent(models.Model):
    """A Stripe event we received. The unique event id, written in the same transaction as the event's
    work, is what makes every event act at most once."""

    class Status(models.TextChoices):
        PROCESSED = "processed", "Processed"
        IGNORED = "ignored", "Ignored"

    event_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=60)
    payload = models.JSONField()
    status = models.CharField(max_length=10, choices=Status.choices)
    outcome = models.CharField(max_length=300, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)


class ReconciliationRun(models.Model):
    """One run of the reconciliation (``manage.py billing_reconcile`` or the operator's button) and what it
    found; kept so operators see the history of results."""

    started_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    differences = models.JSONField(default=list, help_text="Each difference: subject, what, ours, stripe.")
    error = models.TextField(blank=True, help_text="Why the run could not finish (e.g. Stripe unreachable).")
    triggered_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["-started_at"]


class StripeEventFailure(models.Model):
    """A Stripe event whose processing failed (answered 5xx, so Stripe delivers it again); recorded outside
    the failed transaction so operators see failures that have not yet been repaired by a redelivery."""

    event_id = models.CharField(max_length=100, db_index=True)
    type = models.CharField(max_length=60)
    error = models.CharField(max_length=500)
    failed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-failed_at"]
