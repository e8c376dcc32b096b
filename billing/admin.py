from django.contrib import admin

from billing.models import LedgerAccount, LedgerEntry, LedgerTransaction, MeterRecord


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
    list_display = ["id", "job", "vehicle", "owner", "tokens", "mops", "price_micros", "charge_femto", "energy_mwh", "created_at"]
    list_filter = ["currency"]
    search_fields = ["vehicle__name", "owner__email", "job__id"]
    date_hierarchy = "created_at"
