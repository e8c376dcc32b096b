import json
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from marketplace import corpus, services
from tests.factories import BuyerFactory, VehicleFactory, future


def pytest_configure(config):
    # The SQLite test database is a file (the live-server and end-to-end tests' processes open it too), by
    # default under VAR_DIR, which the settings no longer create on import: its directory is made here.
    database = django_settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        Path(database["TEST"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def buyer(db):
    return BuyerFactory()


@pytest.fixture
def api_key(buyer):
    _, secret = services.api_key_create(organisation=buyer.organisation, name="test", created_by=buyer)
    return secret


@pytest.fixture
def api(api_key):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


@pytest.fixture
def make_job(buyer):
    """Create a job of ``docs`` corpus documents for the buyer through the service (its budget reserved from
    the organisation's test credit)."""

    def make(docs: int = 16, precision: str = "int8", price: int = 2_000_000, organisation=None,
             budget_cap: int | None = None):
        return services.job_create(
            organisation=organisation or buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
            precision=precision, max_price_micros=price, deadline=future(), budget_cap_minor=budget_cap,
            inputs=jsonl(corpus.documents(docs)).splitlines(keepends=True))

    return make


@pytest.fixture
def vehicle(db):
    return VehicleFactory()
