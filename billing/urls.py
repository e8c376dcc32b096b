from django.urls import path, re_path

from billing import views

app_name = "billing"

urlpatterns = [
    path("stripe/webhook/", views.stripe_webhook, name="stripe-webhook"),
    # owner
    path("earnings/", views.owner_earnings, name="owner-earnings"),
    path("earnings/payouts/setup/", views.owner_onboarding, name="owner-onboarding"),
    path("earnings/payouts/setup/refresh/", views.owner_onboarding_refresh, name="owner-onboarding-refresh"),
    path("earnings/payouts/setup/return/", views.owner_onboarding_return, name="owner-onboarding-return"),
    # buyer
    path("account/", views.buyer_billing, name="buyer-billing"),
    path("account/top-up/", views.top_up, name="top-up"),
    path("account/cards/test-card/", views.card_add, name="card-add"),
    path("account/cards/setup/", views.card_setup, name="card-setup"),
    path("account/cards/setup/done/", views.card_setup_done, name="card-setup-done"),
    path("account/auto-top-up/", views.auto_top_up, name="auto-top-up"),
    path("account/receipts/<int:pk>/", views.receipt, name="receipt"),
    re_path(r"^account/statements/(?P<year>\d{4})-(?P<month>\d{2})\.csv$", views.statement, name="statement"),
    # operator
    path("operator/", views.operator_billing, name="operator-billing"),
    path("operator/reconcile/", views.operator_reconcile, name="operator-reconcile"),
]
