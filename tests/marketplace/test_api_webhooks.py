"""Outbound signed webhooks: endpoints through the API, events where jobs change, delivery to a real HTTP
server on loopback, signatures checked with the verification code of docs/api.md, retries with backoff."""

import base64
import json
import re
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from fleet.models import Vehicle
from marketplace import buyer_webhooks, flows, services, tasks
from marketplace.models import Job, WebhookDelivery, BuyerWebhookEvent
from tests.support.capacity import deliver
from tests.factories import BuyerFactory, VehicleFactory
from tests.marketplace.test_api import assert_error, client_with

pytestmark = pytest.mark.django_db


def _docs_verifier():
    """The signature verification code that docs/api.md gives buyers, run as is."""
    guide = (Path(django_settings.BASE_DIR) / "docs" / "api.md").read_text()
    code = re.search(r"<!-- verify-signature -->\s*```python\n(.*?)```", guide, re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 -- our own documentation
    return namespace["verify_signature"]


verify_signature = _docs_verifier()


class Receiver:
    """A buyer's webhook endpoint: a real HTTP server on loopback that records what it gets and answers with
    the statuses queued in ``answers`` (200 once they run out)."""

    def __init__(self):
        self.received: list[tuple[dict, bytes]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.received]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


@pytest.fixture(autouse=True)
def loopback_allowed(settings):
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = True


def endpoint_create(api, url: str, events=()) -> dict:
    response = api.post("/api/v1/webhooks/", {"url": url, "events": list(events)}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def complete_units(job: Job, count: int) -> None:
    """``count`` more of the job's units computed by a car, through the fleet's real lease and result path."""
    car = Vehicle.objects.first()
    if car is None:  # proven fast enough to be sold, and to hold, several units in a round
        car = VehicleFactory()
        deliver(car, mops_per_s=50_000)
    flows.auction_tick()
    units, why = flows.units_lease(vehicle_id=car.pk, max_units=count)
    assert len(units) == count, why
    rng = np.random.default_rng(0)
    for unit in units:
        vectors = [rng.normal(size=job.ai_model.dims).astype("<f4") for _ in unit.inputs]
        encoded = [base64.b64encode((v / np.linalg.norm(v)).astype("<f4").tobytes()).decode() for v in vectors]
        accepted, why = flows.unit_complete(vehicle_id=car.pk, unit_id=unit.pk, epoch=unit.lease_epoch, result=encoded)
        assert accepted, why


# --- endpoints -----------------------------------------------------------------------------------------

def test_an_endpoint_is_created_with_its_secret_shown_once(api, receiver):
    created = endpoint_create(api, receiver.url, ["job.completed"])
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
    assert created["events"] == ["job.completed"]
    shown = api.get(f"/api/v1/webhooks/{created['id']}/").json()
    assert "secret" not in shown and shown["url"] == receiver.url
    assert [e["id"] for e in api.get("/api/v1/webhooks/").json()["results"]] == [created["id"]]
    assert "secret" not in api.get("/api/v1/webhooks/").json()["results"][0]


@pytest.mark.parametrize("body, field", [
    ({"url": "ftp://example.com/hook"}, "url"),
    ({"url": "not a url"}, "url"),
    ({"url": "https://example.com/hook", "events": ["job.started"]}, "events"),
    ({"url": "https://example.com:99999/hook"}, "url"),
    ({}, "url"),
])
def test_a_bad_endpoint_is_a_400_naming_the_field(api, body, field):
    assert field in assert_error(api.post("/api/v1/webhooks/", body, format="json"), 400, "invalid")["fields"]


@pytest.mark.parametrize("url, problem", [
    ("http://example.com/hook", "must use https"),
    ("https://127.0.0.1/hook", "public addresses only"),
    ("https://localhost:8443/hook", "public addresses only"),
    ("https://10.1.2.3/hook", "public addresses only"),
])
def test_outside_the_embedded_profile_endpoints_must_be_public_https(api, settings, url, problem):
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = False
    error = assert_error(api.post("/api/v1/webhooks/", {"url": url}, format="json"), 400, "invalid")
    assert problem in error["fields"]["url"][0]


def test_another_organisations_endpoint_is_not_found(api, receiver):
    other = BuyerFactory()
    _, secret = services.api_key_create(organisation=other.organisation, name="o", created_by=other)
    theirs = endpoint_create(client_with(secret), receiver.url)
    for response in (api.get(f"/api/v1/webhooks/{theirs['id']}/"), api.delete(f"/api/v1/webhooks/{theirs['id']}/"),
                     api.get(f"/api/v1/webhooks/{theirs['id']}/deliveries/")):
        assert_error(response, 404, "not_found")
    assert api.get("/api/v1/webhooks/").json()["results"] == []


# --- events and their delivery -------------------------------------------------------------------------

def test_a_job_sends_signed_progress_then_completed_to_the_buyer(api, receiver, make_job):
    # Given an endpoint, and a job of two units,
    endpoint = endpoint_create(api, receiver.url)
    job = make_job(docs=16)
    # when a car computes one unit, then the other, and the delivery task runs,
    complete_units(job, 1)
    complete_units(job, 1)
    assert tasks.webhooks_send.apply().get() == 2  # the periodic task, run here in both profiles
    # then the buyer got job.progress then job.completed, each signed with the endpoint's secret,
    events = receiver.events()
    assert [e["type"] for e in events] == ["job.progress", "job.completed"]
    for headers, body in receiver.received:
        assert verify_signature(endpoint["secret"], headers["Marketplace-Signature"], body)
        assert not verify_signature("whsec_wrong", headers["Marketplace-Signature"], body)
        assert not verify_signature(endpoint["secret"], headers["Marketplace-Signature"], body + b" ")
        assert headers["Content-Type"] == "application/json"
    progress, completed = events
    assert progress["data"]["job"]["units_done"] == 1 and completed["data"]["job"]["state"] == "completed"
    assert completed["data"]["job"] == api.get(f"/api/v1/jobs/{job.pk}/").json()
    assert completed["id"].startswith("evt_") and abs(completed["created"] - time.time()) < 60
    # and the delivery log says so.
    log = api.get(f"/api/v1/webhooks/{endpoint['id']}/deliveries/").json()["results"]
    assert [(d["event_type"], d["state"], d["attempts"], d["last_status_code"], d["next_attempt_at"]) for d in log] == [
        ("job.completed", "succeeded", 1, 200, None), ("job.progress", "succeeded", 1, 200, None)]


def test_an_old_timestamp_fails_verification(api, receiver, make_job):
    endpoint = endpoint_create(api, receiver.url)
    body = b'{"id":"evt_1"}'
    old = buyer_webhooks.signature(secret=endpoint["secret"], timestamp=int(time.time()) - 600, body=body)
    assert not verify_signature(endpoint["secret"], old, body)


def test_progress_is_sent_at_most_once_a_minute_per_job(api, receiver, make_job):
    endpoint_create(api, receiver.url)
    job = make_job(docs=32)  # four units
    complete_units(job, 2)
    assert list(BuyerWebhookEvent.objects.values_list("type", flat=True)) == ["job.progress"]
    BuyerWebhookEvent.objects.update(created_at=timezone.now() - timedelta(seconds=61))
    complete_units(job, 1)
    complete_units(job, 1)
    assert sorted(BuyerWebhookEvent.objects.values_list("type", flat=True)) == ["job.completed", "job.progress", "job.progress"]


def test_a_cancelled_or_expired_job_sends_job_failed(api, receiver, make_job):
    endpoint_create(api, receiver.url)
    cancelled, expired = make_job(), make_job()
    api.post(f"/api/v1/jobs/{cancelled.pk}/cancel/")
    Job.objects.filter(pk=expired.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    flows.jobs_expire()
    api.post(f"/api/v1/jobs/{cancelled.pk}/cancel/")  # a second cancel changes nothing, sends nothing
    buyer_webhooks.deliveries_send()
    assert sorted((e["type"], e["data"]["job"]["id"], e["data"]["job"]["state"]) for e in receiver.events()) == sorted(
        [("job.failed", cancelled.pk, "cancelled"), ("job.failed", expired.pk, "expired")])


def test_an_endpoint_gets_only_the_events_it_asked_for_and_nobody_listening_costs_no_event(api, receiver, make_job):
    job = make_job(docs=16)
    complete_units(job, 1)
    assert BuyerWebhookEvent.objects.count() == 0  # nobody listens yet
    endpoint_create(api, receiver.url, ["job.completed"])
    complete_units(job, 1)
    buyer_webhooks.deliveries_send()
    assert [e["type"] for e in receiver.events()] == ["job.completed"]


def test_failed_attempts_are_retried_with_exponential_backoff(api, receiver, make_job, settings):
    # Given an endpoint that answers 500, then 503, then 200,
    settings.WEBHOOK_RETRY_BASE_S = 30
    receiver.answers = [500, 503]
    endpoint_create(api, receiver.url)
    api.post(f"/api/v1/jobs/{make_job().pk}/cancel/")
    delivery = WebhookDelivery.objects.get()

    def attempt() -> WebhookDelivery:
        before = timezone.now()
        assert buyer_webhooks.deliveries_send() == 1
        delivery.refresh_from_db()
        return before

    # the first attempt fails and the next is due after the base delay,
    before = attempt()
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("pending", 1, 500)
    assert before + timedelta(seconds=29) < delivery.next_attempt_at < timezone.now() + timedelta(seconds=31)
    assert buyer_webhooks.deliveries_send() == 0  # not due yet
    # the second after twice as long,
    WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    before = attempt()
    assert (delivery.attempts, delivery.last_status_code, delivery.last_error) == (2, 503, "answered HTTP 503")
    assert before + timedelta(seconds=59) < delivery.next_attempt_at < timezone.now() + timedelta(seconds=61)
    # and the third is delivered: the same event, byte for byte.
    WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    attempt()
    assert (delivery.state, delivery.attempts, delivery.last_status_code, delivery.next_attempt_at) == ("succeeded", 3, 200, None)
    assert len({body for _, body in receiver.received}) == 1 and len(receiver.received) == 3


def test_an_unreachable_endpoint_is_given_up_after_the_last_attempt(api, make_job, settings):
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    closed = Receiver()
    closed.stop()  # nothing listens on its port any more
    endpoint = endpoint_create(api, closed.url)
    api.post(f"/api/v1/jobs/{make_job().pk}/cancel/")
    buyer_webhooks.deliveries_send()
    WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    buyer_webhooks.deliveries_send()
    (logged,) = api.get(f"/api/v1/webhooks/{endpoint['id']}/deliveries/").json()["results"]
    assert (logged["state"], logged["attempts"], logged["last_status_code"], logged["next_attempt_at"]) == ("failed", 2, None, None)
    assert "ConnectError" in logged["last_error"]


def test_a_delivery_being_sent_is_not_due_for_another_sweep(api, receiver, make_job, monkeypatch):
    endpoint_create(api, receiver.url)
    api.post(f"/api/v1/jobs/{make_job().pk}/cancel/")
    seen = []
    real = buyer_webhooks._post_all

    def spy(batch):
        seen.append(WebhookDelivery.objects.filter(state="pending", next_attempt_at__lte=timezone.now()).count())
        return real(batch)

    monkeypatch.setattr(buyer_webhooks, "_post_all", spy)
    assert buyer_webhooks.deliveries_send() == 1 and seen == [0]


def test_an_endpoint_no_longer_allowed_is_not_sent_to(api, receiver, make_job, settings):
    endpoint_create(api, receiver.url)
    api.post(f"/api/v1/jobs/{make_job().pk}/cancel/")
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = False
    buyer_webhooks.deliveries_send()
    delivery = WebhookDelivery.objects.get()
    assert receiver.received == [] and delivery.last_error == "not sent: the URL must use https"


def test_a_deleted_endpoint_gets_nothing_more(api, receiver, make_job):
    endpoint = endpoint_create(api, receiver.url)
    api.post(f"/api/v1/jobs/{make_job().pk}/cancel/")
    assert api.delete(f"/api/v1/webhooks/{endpoint['id']}/").status_code == 204
    api.post(f"/api/v1/jobs/{make_job().pk}/cancel/")
    assert buyer_webhooks.deliveries_send() == 0 and receiver.received == []
    assert WebhookDelivery.objects.get().state == "failed" and BuyerWebhookEvent.objects.count() == 1
    assert_error(api.get(f"/api/v1/webhooks/{endpoint['id']}/"), 404, "not_found")
