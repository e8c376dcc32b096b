"""Throttling per API key: over the rate, 429 in the stable error shape with Retry-After; other keys, and
anonymous requests to the public catalogue, are not held back."""

import pytest
from django.conf import settings as django_settings
from django.core.cache import cache

from marketplace import services
from tests.factories import BuyerFactory
from tests.marketplace.test_api import assert_error, client_with

pytestmark = pytest.mark.django_db


@pytest.fixture
def three_a_minute(settings):
    settings.REST_FRAMEWORK = {**django_settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"api_key": "3/min"}}


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(three_a_minute, api, buyer, client):
    # Given a rate of three requests a minute, when one key sends a fourth,
    assert [api.get("/api/v1/jobs/").status_code for _ in range(3)] == [200] * 3
    response = api.get("/api/v1/jobs/")
    # then it is refused in the stable shape, saying when to come back,
    error = assert_error(response, 429, "throttled")
    assert 0 < int(response["Retry-After"]) <= 60 and error["retry_after_s"] == int(response["Retry-After"])
    assert_error(api.post("/api/v1/jobs/1/cancel/", HTTP_IDEMPOTENCY_KEY="t"), 429, "throttled")  # POSTs count too
    # while another key of the same organisation has its own count, and the public catalogue stays open.
    _, other = services.api_key_create(organisation=buyer.organisation, name="other", created_by=buyer)
    assert client_with(other).get("/api/v1/jobs/").status_code == 200
    assert all(client.get("/api/v1/models/").status_code == 200 for _ in range(5))


def test_a_signed_in_buyer_is_throttled_per_user(three_a_minute, client):
    buyer = BuyerFactory()
    cache.delete(f"throttle_api_key_user:{buyer.pk}")  # ids come back after rollbacks: no count from another test
    client.force_login(buyer)
    assert [client.get("/api/v1/jobs/").status_code for _ in range(4)] == [200, 200, 200, 429]
