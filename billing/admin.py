from django.contrib import admin

from billing.models import (
    AutoTopUp,
    ConnectedAccount,
    Dispute,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    MeterRecord,
    Payout,
    PayoutReversal,
    PlatformFee,
    ReconciliationRun,
    Refund,
    Reservation,
    SavedCard,
    SettlementRun,
    StripeCustomer,
    StripeEvent,
    StripeEventFailure,
    StripeRequest,
    TopUp,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Ledger rows are append-only: visible to operators, never edited here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(LedgerAccount)
class LedgerAccountAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "organisation", "owner", "currency", "carry_femto"]
    list_filter = ["kind", "currency"]
    search_fields = ["organisation__name", "owner__email"]


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    fields = ["account", "amount_minor", "currency"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "description", "job", "currency", "created_at"]
    list_filter = ["kind", "currency"]
    search_fields = ["description", "job__id"]
    date_hierarchy = "created_at"
    inlines = [EntryInline]


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "transaction", "account", "amount_minor", "currency"]
    list_filter = ["account__kind", "currency"]
    search_fields = ["account__organisation__name", "account__owner__email"]


@admin.register(MeterRecord)
class MeterRecordAdmin(ReadOnlyAdmin):
    list_display = ["id", "job", "vehicle", "owner", "tokens", "mops", "price_micros", "charge_femto", "energy_mwh", "duration_ms", "created_at"]
    list_filter = ["currency"]
    search_fields = ["vehicle__name", "owner__email", "job__id"]
    date_hierarchy = "created_at"



@admin.register(TopUp)
class TopUpAdmin(ReadOnlyAdmin):
    list_display = ["id", "organisation", "amount_minor", "currency", "status", "refunded_minor", "disputed_minor",
                    "payment_intent_id", "created_at"]
    list_filter = ["status", "currency"]
    search_fields = ["organisation__name", "payment_intent_id", "charge_id"]


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdmin):
    list_display = ["id", "top_up", "amount_minor", "status", "stripe_refund_id", "created_at"]
    list_filter = ["status"]


@admin.register(Dispute)
class DisputeAdmin(ReadOnlyAdmin):
    list_display = ["stripe_dispute_id", "top_up", "amount_minor", "from_balance_minor", "loss_minor", "created_at"]


@admin.register(ConnectedAccount)
class ConnectedAccountAdmin(ReadOnlyAdmin):
    list_display = ["owner", "stripe_account_id", "details_submitted", "payouts_enabled", "transfers_active"]
    search_fields = ["owner__email", "stripe_account_id"]


@admin.register(SettlementRun)
class SettlementRunAdmin(ReadOnlyAdmin):
    list_display = ["key", "transfer_group", "currency", "holdback_days", "min_payout_minor", "started_at"]


@admin.register(Payout)
class PayoutAdmin(ReadOnlyAdmin):
    list_display = ["id", "run", "owner", "amount_minor", "currency", "status", "transfer_id", "reversed_minor"]
    list_filter = ["status", "run"]
    search_fields = ["owner__email", "transfer_id"]


@admin.register(PayoutReversal)
class PayoutReversalAdmin(ReadOnlyAdmin):
    list_display = ["id", "payout", "amount_minor", "reason", "stripe_reversal_id", "created_at"]


@admin.register(StripeEvent)
class WebhookEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "type", "status", "outcome", "received_at"]
    list_filter = ["status", "type"]
    search_fields = ["event_id"]


@admin.register(StripeRequest)
class StripeRequestAdmin(ReadOnlyAdmin):
    list_display = ["key", "purpose", "status", "stripe_id", "attempts", "updated_at"]
    list_filter = ["status", "purpose"]
    search_fields = ["key", "stripe_id"]


admin.site.register(StripeCustomer, ReadOnlyAdmin)
admin.site.register(SavedCard, ReadOnlyAdmin)


@admin.register(PlatformFee)
class PlatformFeeAdmin(admin.ModelAdmin):
    """Operators set the fee here: add a row (from now or a later moment); rows are never changed, so the
    history stays."""

    list_display = ["fee_bps", "effective_from", "note", "created_by", "created_at"]
    fields = ["fee_bps", "effective_from", "note"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        from billing.services import platform_fee_set

        platform_fee_set(fee_bps=obj.fee_bps, effective_from=obj.effective_from, note=obj.note, user=request.user)


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = ["job", "organisation", "amount_minor", "drawn_minor", "charged_femto", "released_minor", "status"]
    list_filter = ["status"]


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyAdmin):
    list_display = ["id", "started_at", "finished_at", "difference_count", "error", "triggered_by"]

    @admin.display(description="differences")
    def difference_count(self, run):
        return len(run.differences)


@admin.register(StripeEventFailure)
class StripeEventFailureAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "type", "error", "failed_at"]
    list_filter = ["type"]
    search_fields = ["event_id"]


admin.site.register(AutoTopUp, ReadOnlyAdmin)
