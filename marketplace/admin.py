from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from marketplace.models import (AIModel, Allocation, ApiKey, AuctionRound, IdempotencyKey, Job, Organisation, User,
                                WebhookDelivery, WebhookEndpoint, BuyerWebhookEvent)


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    ordering = ["email"]
    list_display = ["email", "role", "organisation", "is_active", "is_staff", "date_joined"]
    list_filter = ["role", "is_active", "is_staff"]
    search_fields = ["email", "organisation__name"]
    fieldsets = [
        (None, {"fields": ["email", "password", "role", "organisation"]}),
        ("Permissions", {"fields": ["is_active", "is_staff", "is_superuser", "groups", "user_permissions"]}),
        ("Dates", {"fields": ["last_login", "date_joined"]}),
    ]
    add_fieldsets = [(None, {"classes": ["wide"], "fields": ["email", "role", "password1", "password2"]})]


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ["name", "prefix", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Organisation)
class OrganisationAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    inlines = [ApiKeyInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "organisation", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["prefix", "name", "organisation__name"]
    readonly_fields = ["prefix", "key_hash", "created_at", "last_used_at"]


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "task", "runtime", "precisions", "dims", "ops_per_token", "active"]
    list_filter = ["task", "active"]
    search_fields = ["slug", "name"]


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "organisation", "ai_model", "precision", "state", "units_done", "units_total",
                    "max_price_micros", "deadline", "created_at"]
    list_filter = ["state", "precision", "ai_model"]
    search_fields = ["id", "organisation__name"]
    readonly_fields = ["docs_total", "tokens_total", "mops_total", "units_total", "units_done", "created_at",
                       "started_at", "finished_at"]
    date_hierarchy = "created_at"


class AllocationInline(admin.TabularInline):
    model = Allocation
    fields = ["job", "vehicle", "price_micros", "mops", "remaining_mops"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(AuctionRound)
class AuctionRoundAdmin(admin.ModelAdmin):
    list_display = ["id", "market", "cleared_at", "clearing_price_micros", "offered_mops", "demanded_mops", "sold_mops"]
    list_filter = ["market"]
    date_hierarchy = "cleared_at"
    readonly_fields = [f.name for f in AuctionRound._meta.fields]
    inlines = [AllocationInline]


@admin.register(Allocation)
class AllocationAdmin(admin.ModelAdmin):
    list_display = ["id", "round", "job", "vehicle", "price_micros", "mops", "remaining_mops"]
    list_filter = ["round__market"]
    search_fields = ["job__id", "vehicle__name"]
    raw_id_fields = ["round", "job", "vehicle"]


class RecordAdmin(admin.ModelAdmin):
    """Records the product writes (API keys' replies, webhooks): operators read them, nobody adds one here."""

    def has_add_permission(self, request):
        return False


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(RecordAdmin):
    list_display = ["key", "scope", "path", "response_status", "created_at", "completed_at"]
    list_filter = ["response_status"]
    search_fields = ["key", "scope"]
    readonly_fields = [f.name for f in IdempotencyKey._meta.fields]


class WebhookDeliveryInline(admin.TabularInline):
    model = WebhookDelivery
    fields = ["event", "state", "attempts", "last_status_code", "last_error", "next_attempt_at", "delivered_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(RecordAdmin):
    """The signing secret stays out of the admin: it is the buyer's."""

    list_display = ["id", "organisation", "url", "events", "created_at", "disabled_at"]
    list_filter = [("disabled_at", admin.EmptyFieldListFilter)]
    search_fields = ["url", "organisation__name"]
    fields = ["organisation", "url", "events", "description", "created_by", "created_at", "disabled_at"]
    readonly_fields = fields


@admin.register(BuyerWebhookEvent)
class BuyerWebhookEventAdmin(RecordAdmin):
    list_display = ["public_id", "type", "organisation", "job", "created_at"]
    list_filter = ["type"]
    search_fields = ["public_id", "organisation__name", "job__id"]
    readonly_fields = [f.name for f in BuyerWebhookEvent._meta.fields]
    inlines = [WebhookDeliveryInline]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(RecordAdmin):
    list_display = ["id", "event", "endpoint", "state", "attempts", "last_status_code", "next_attempt_at", "delivered_at"]
    list_filter = ["state"]
    search_fields = ["event__public_id", "endpoint__url"]
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
