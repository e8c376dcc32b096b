import pytest

from billing import stripe_api
from billing.localpeer import LocalStripePeer
from tests.support.stripe_peer import LosingHttpClient, PeerClient


@pytest.fixture(scope="session")
def stripe_peer_process():
    with LocalStripePeer() as peer:
        yield peer


@pytest.fixture
def stripe_peer(stripe_peer_process, settings, monkeypatch):
    """Point billing at the session's local Stripe peer, emptied, with a network that can lose answers."""
    settings.STRIPE_API_BASE = stripe_peer_process.url
    settings.STRIPE_SECRET_KEY = "sk_test_billing_tests"
    settings.STRIPE_WEBHOOK_SECRET = "whsec_billing_tests"
    client = PeerClient(stripe_peer_process, settings.STRIPE_SECRET_KEY)
    client.flush()
    stripe_peer_process.register_webhook(url="http://127.0.0.1:9/", secret="-", events=["none"])  # deliveries off
    network = LosingHttpClient()
    monkeypatch.setattr(stripe_api, "http_client", network)
    client.network = network
    return client
