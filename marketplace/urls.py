from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from fleet import api as fleet_api
from fleet import views as fleet_views
from marketplace import api, openai_api, views

api_v1 = [
    path("models/", api.ModelListApi.as_view(), name="api-models"),
    path("jobs/", api.JobListCreateApi.as_view(), name="api-jobs"),
    path("jobs/<int:pk>/", api.JobDetailApi.as_view(), name="api-job"),
    path("jobs/<int:pk>/cancel/", api.JobCancelApi.as_view(), name="api-job-cancel"),
    path("jobs/<int:pk>/bid/", api.JobBidApi.as_view(), name="api-job-bid"),
    path("jobs/<int:pk>/budget/", api.JobBudgetApi.as_view(), name="api-job-budget"),
    path("jobs/<int:pk>/results/", api.JobResultsApi.as_view(), name="api-job-results"),
    path("jobs/<int:pk>/data/", api.JobDataApi.as_view(), name="api-job-data"),
    path("rounds/", api.RoundListApi.as_view(), name="api-rounds"),
    path("keys/", api.ApiKeyListApi.as_view(), name="api-keys"),
    path("keys/<int:pk>/", api.ApiKeyDetailApi.as_view(), name="api-key"),
    path("webhooks/", api.WebhookEndpointListCreateApi.as_view(), name="api-webhooks"),
    path("webhooks/<int:pk>/", api.WebhookEndpointDetailApi.as_view(), name="api-webhook"),
    path("webhooks/<int:pk>/deliveries/", api.WebhookDeliveryListApi.as_view(), name="api-webhook-deliveries"),
    path("fleet/pair/", fleet_api.PairApi.as_view(), name="api-pair"),
    path("fleet/units/<int:unit_id>/<int:epoch>/inputs/", fleet_api.UnitInputsApi.as_view(), name="api-unit-inputs"),
    path("vehicles/", fleet_api.VehicleListApi.as_view(), name="api-vehicles"),
    path("vehicles/pause-all/", fleet_api.PauseAllApi.as_view(pause=True), name="api-vehicles-pause-all"),
    path("vehicles/resume-all/", fleet_api.PauseAllApi.as_view(pause=False), name="api-vehicles-resume-all"),
    path("vehicles/<int:pk>/", fleet_api.VehicleDetailApi.as_view(), name="api-vehicle"),
    path("vehicles/<int:pk>/policy/", fleet_api.VehiclePolicyApi.as_view(), name="api-vehicle-policy"),
    path("vehicles/<int:pk>/pause/", fleet_api.VehiclePauseApi.as_view(pause=True), name="api-vehicle-pause"),
    path("vehicles/<int:pk>/resume/", fleet_api.VehiclePauseApi.as_view(pause=False), name="api-vehicle-resume"),
    path("vehicles/<int:pk>/pairing-code/", fleet_api.PairingCodeApi.as_view(), name="api-vehicle-pairing-code"),
    path("vehicles/<int:pk>/rotate-token/", fleet_api.TokenRotateApi.as_view(), name="api-vehicle-rotate-token"),
    path("vehicles/<int:pk>/revoke-token/", fleet_api.TokenRevokeApi.as_view(), name="api-vehicle-revoke-token"),
]

# The OpenAI-compatible API (marketplace.openai_api): every route with or without a trailing slash, since the
# OpenAI client does not follow APPEND_SLASH's redirect.
openai_v1 = [
    re_path(r"^models/?$", openai_api.ModelListApi.as_view(), name="openai-models"),
    re_path(r"^files/?$", openai_api.FileListCreateApi.as_view(), name="openai-files"),
    re_path(r"^files/(?P<file_id>[\w-]+)/?$", openai_api.FileDetailApi.as_view(), name="openai-file"),
    re_path(r"^files/(?P<file_id>[\w-]+)/content/?$", openai_api.FileContentApi.as_view(), name="openai-file-content"),
    re_path(r"^batches/?$", openai_api.BatchListCreateApi.as_view(), name="openai-batches"),
    re_path(r"^batches/(?P<batch_id>[\w-]+)/?$", openai_api.BatchDetailApi.as_view(), name="openai-batch"),
    re_path(r"^batches/(?P<batch_id>[\w-]+)/cancel/?$", openai_api.BatchCancelApi.as_view(), name="openai-batch-cancel"),
    re_path(r"^(?P<path>.*)$", openai_api.not_found),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("buyer/", views.buyer_dashboard, name="buyer-dashboard"),
    path("market/", views.market_view, name="market"),
    path("buyer/jobs/new/", views.job_new, name="job-new"),
    path("buyer/jobs/estimate/", views.job_estimate, name="job-estimate"),
    path("buyer/jobs/<int:pk>/", views.job_detail, name="job-detail"),
    path("buyer/jobs/<int:pk>/cancel/", views.job_cancel, name="job-cancel"),
    path("buyer/jobs/<int:pk>/results/", views.job_results, name="job-results"),
    path("buyer/jobs/<int:pk>/delete-data/", views.job_data_delete, name="job-data-delete"),
    path("buyer/jobs/<int:pk>/terms/", views.job_terms, name="job-terms"),
    path("buyer/team/", views.team, name="team"),
    path("buyer/team/<int:pk>/remove/", views.team_member_remove, name="team-member-remove"),
    path("buyer/keys/", views.api_key_create, name="api-key-create"),
    path("buyer/keys/<int:pk>/revoke/", views.api_key_revoke, name="api-key-revoke"),
    path("buyer/keys/<int:pk>/default-bid/", views.api_key_default_bid, name="api-key-default-bid"),
    path("owner/", fleet_views.owner_dashboard, name="owner-dashboard"),
    path("owner/pause-all/", fleet_views.vehicles_pause_all, {"pause": True}, name="vehicles-pause-all"),
    path("owner/resume-all/", fleet_views.vehicles_pause_all, {"pause": False}, name="vehicles-resume-all"),
    path("owner/cars/<int:pk>/", fleet_views.vehicle_detail, name="vehicle-detail"),
    path("owner/cars/<int:pk>/limits/", fleet_views.vehicle_limits, name="vehicle-limits"),
    path("owner/cars/<int:pk>/pause/", fleet_views.vehicle_pause, {"pause": True}, name="vehicle-pause"),
    path("owner/cars/<int:pk>/resume/", fleet_views.vehicle_pause, {"pause": False}, name="vehicle-resume"),
    path("owner/cars/<int:pk>/pairing-code/", fleet_views.vehicle_pairing_code, name="vehicle-pairing-code"),
    path("owner/cars/<int:pk>/rotate-token/", fleet_views.vehicle_token_rotate, name="vehicle-rotate-token"),
    path("owner/cars/<int:pk>/revoke-token/", fleet_views.vehicle_token_revoke, name="vehicle-revoke-token"),
    path("owner/cars/<int:pk>/remove/", fleet_views.vehicle_remove, name="vehicle-remove"),
    path("accounts/", include("allauth.urls")),
    path("billing/", include("billing.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("v1/", include(openai_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
]
