import json
import os
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from hypothesis import settings as hypothesis_settings

from marketplace import corpus, flows, services
from tests.factories import BuyerFactory, VehicleFactory, future

# Hypothesis profiles: `make test` runs "fast"; CI exports HYPOTHESIS_PROFILE=thorough (.ci/run), for its
# embedded and its services run alike. Tests set no max_examples of their own; the profile decides. No
# deadline: on these shared 2-core machines one slow example is noise, not a finding (most property tests
# already turned it off). The thorough run prints the blob that replays a failure (@reproduce_failure) and
# stays random, so that each CI run explores new examples.
hypothesis_settings.register_profile("fast", max_examples=1000, deadline=None)
hypothesis_settings.register_profile("thorough", max_examples=4000, deadline=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# Relative cost, decided here rather than per test: an example of a pure rule (clearing, eligibility, money)
# takes 1-20 ms, an example that builds a world in the database (a job, a fleet, the Stripe peer: the lease
# rule, usage booking, the ledger interleavings) about a second, a hundred times more, and those run again in
# the services profile. They take `@settings(SLOW_EXAMPLES, ...)`: an eightieth of the profile's examples
# (12 fast, 50 thorough), so that each costs about what a pure test costs rather than a hundred times more.
# The profile's count scales both.
SLOW_EXAMPLES = hypothesis_settings(max_examples=max(1, hypothesis_settings.default.max_examples // 80))


#: Verification as marketplace.settings deploys it (read before this process turns it off, below).
DEPLOYED_VERIFICATION = dict.fromkeys(["VERIFY_PROBATION", "VERIFY_REPLICATION_FLOOR", "CANARY_SHARE"])


def pytest_configure(config):
    # The SQLite test database is a file (the live-server and end-to-end tests' processes open it too), by
    # default under VAR_DIR, which the settings no longer create on import: its directory is made here.
    database = django_settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        Path(database["TEST"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Verification draws at random which results are checked. In this process, tests about other things accept
    # every result unchecked; tests of verification turn it on with the ``verifying`` fixture. The servers the
    # end-to-end and chaos tests start run the defaults: verification on.
    DEPLOYED_VERIFICATION.update({name: getattr(django_settings, name) for name in DEPLOYED_VERIFICATION})
    django_settings.VERIFY_PROBATION, django_settings.VERIFY_REPLICATION_FLOOR, django_settings.CANARY_SHARE = 0, 0.0, 0.0


@pytest.fixture
def verifying(settings):
    """Verification as deployed (marketplace.settings' defaults): every result of a new car is replicated,
    then fewer; 1 % of every job's units are canaries."""
    for name, value in DEPLOYED_VERIFICATION.items():
        setattr(settings, name, value)
    return settings


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
        return flows.job_create(
            organisation=organisation or buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
            precision=precision, max_price_micros=price, deadline=future(), budget_cap_minor=budget_cap,
            inputs=jsonl(corpus.documents(docs)).splitlines(keepends=True))

    return make


@pytest.fixture
def vehicle(db):
    return VehicleFactory()
