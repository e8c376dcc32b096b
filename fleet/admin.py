from django.contrib import admin

from fleet import selectors, services
from fleet.models import HardwareGeneration, HardwareThroughput, Lease, OwnerPolicy, Vehicle, WorkUnit


class ThroughputInline(admin.TabularInline):
    model = HardwareThroughput
    extra = 0


@admin.register(HardwareGeneration)
class HardwareGenerationAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "watts", "status"]
    list_filter = ["status"]
    search_fields = ["code", "name"]
    inlines = [ThroughputInline]


@admin.register(HardwareThroughput)
class HardwareThroughputAdmin(admin.ModelAdmin):
    list_display = ["hardware", "precision", "gops_per_s"]
    list_filter = ["precision", "hardware"]


class PolicyInline(admin.StackedInline):
    model = OwnerPolicy
    can_delete = False


class SuspendedFilter(admin.SimpleListFilter):
    """Cars suspended for wrong results (docs/verification.md), and cars under watch after one."""

    title, parameter_name = "standing", "standing"

    def lookups(self, request, model_admin):
        return [("suspended", "Suspended"), ("watched", "Under watch (a recent wrong result)"), ("good", "Good")]

    def queryset(self, request, queryset):
        if self.value() == "suspended":
            return queryset.exclude(suspended_at=None)
        if self.value() == "watched":
            return queryset.filter(suspended_at=None, wrong_recent__gt=0)
        if self.value() == "good":
            return queryset.filter(suspended_at=None, wrong_recent=0)
        return queryset


@admin.register(Vehicle)
class VehicleAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "owner", "hardware", "hardware_mismatch", "connected", "battery_pct", "driving",
                    "on_wifi", "ineligible_reason", "last_seen_at", "work_requested_at", "checks_passed",
                    "wrong_results", "suspended_at"]
    list_filter = [SuspendedFilter, "connected", "hardware", "hardware_mismatch", "agent_version", "driving", "on_wifi",
                   "policy__paused"]
    search_fields = ["name", "owner__email", "token_prefix"]
    readonly_fields = ["token_prefix", "token_hash", "token_issued_at", "token_revoked_at", "pairing_code_hash",
                       "pairing_expires_at", "channel_name", "last_seen_at", "work_requested_at",
                       "hardware_mismatch", "hardware_mismatch_reason"]
    inlines = [PolicyInline]
    actions = ["pause", "revoke_token", "reinstate"]

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "standing_groups": selectors.standing_by_version_and_class()}
        return super().changelist_view(request, extra_context=extra_context)

    @admin.action(description="Reinstate the selected suspended cars (they start again as new cars)")
    def reinstate(self, request, queryset):
        for vehicle in queryset.exclude(suspended_at=None):
            services.vehicle_reinstate(vehicle=vehicle)

    @admin.action(description="Pause the selected cars (withdraws their work)")
    def pause(self, request, queryset):
        for vehicle in queryset:
            services.policy_update(vehicle=vehicle, paused=True)

    @admin.action(description="Revoke the selected cars' device tokens")
    def revoke_token(self, request, queryset):
        for vehicle in queryset:
            services.vehicle_token_revoke(vehicle=vehicle)


@admin.register(OwnerPolicy)
class OwnerPolicyAdmin(admin.ModelAdmin):
    list_display = ["vehicle", "battery_floor_pct", "wifi_only", "paused", "reserve_price_micros", "updated_at"]
    list_filter = ["paused", "wifi_only"]
    search_fields = ["vehicle__name"]


class LeaseInline(admin.TabularInline):
    model = Lease
    fields = ["epoch", "vehicle", "price_micros", "started_at", "ended_at", "outcome", "reason"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(WorkUnit)
class WorkUnitAdmin(admin.ModelAdmin):
    list_display = ["id", "job", "seq", "state", "leased_to", "lease_epoch", "lease_expires_at", "tokens", "mops", "attempts"]
    list_filter = ["state"]
    search_fields = ["job__id"]
    raw_id_fields = ["job", "leased_to", "completed_by", "allocation"]
    exclude = ["result"]
    inlines = [LeaseInline]


@admin.register(Lease)
class LeaseAdmin(admin.ModelAdmin):
    list_display = ["id", "unit", "vehicle", "epoch", "price_micros", "started_at", "ended_at", "outcome", "reason"]
    list_filter = ["outcome"]
    search_fields = ["vehicle__name", "unit__job__id"]
    raw_id_fields = ["unit", "vehicle"]
