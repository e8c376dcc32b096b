import logging

from django.db import DatabaseError
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing import stripe_api, webhooks

log = logging.getLogger(__name__)


@csrf_exempt
@require_POST
def stripe_webhook(request):
    """Stripe's event deliveries: 400 for a bad signature or a stale/future timestamp, 200 once an event is
    processed or ignored (also when delivered again), 503 when it could not be processed now (Stripe
    delivers it again later)."""
    try:
        event = stripe_api.webhook_verify(payload=request.body,
                                          signature_header=request.headers.get("Stripe-Signature"))
    except stripe_api.WebhookSignatureInvalid as error:
        return JsonResponse({"error": {"code": error.code, "message": error.message}}, status=400)
    try:
        record = webhooks.event_process(event=event)
    except (stripe_api.StripeUnavailable, DatabaseError):
        log.warning("stripe event %s could not be processed now", event["id"], exc_info=True)
        return JsonResponse({"error": {"code": "try_again"}}, status=503)
    return JsonResponse({"id": record.event_id, "status": record.status, "outcome": record.outcome})
