"""``Idempotency-Key`` on every POST: a repeat gets the first response and the work is done once; another
request under a used key is refused; keys belong to an organisation and expire after 24 hours."""

import io
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import URLPattern
from django.utils import timezone
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.test import APIClient, APIRequestFactory

from marketplace import flows, idempotency, services, urls
from marketplace.core.errors import Conflict
from marketplace.models import IdempotencyKey, Job
from tests.conftest import jsonl
from tests.factories import BuyerFactory
from tests.marketplace.test_api import assert_error, job_body

pytestmark = pytest.mark.django_db
DEADLINE = (timezone.now() + timedelta(days=2)).isoformat()  # one instant, so that repeats are equal


def post_job(client, key: str | None, **overrides):
    headers = {} if key is None else {"HTTP_IDEMPOTENCY_KEY": key}
    return client.post("/api/v1/jobs/", job_body(deadline=DEADLINE, **overrides), format="json", **headers)


def key_client(organisation, creator=None) -> APIClient:
    creator = creator or BuyerFactory(organisation=organisation)
    _, secret = services.api_key_create(organisation=organisation, name="k", created_by=creator)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_every_post_of_the_buyer_api_honours_the_idempotency_key():
    from marketplace import api

    views = [p.callback.view_class for p in urls.api_v1 if isinstance(p, URLPattern)]
    posts = [view for view in views if view.__module__ == api.__name__ and hasattr(view, "post")]
    assert len(posts) >= 4
    assert all(getattr(view.post, "idempotent", False) for view in posts), [v.__name__ for v in posts]


def test_a_repeat_gets_the_first_response_and_the_job_is_created_once(api):
    body = job_body(deadline=DEADLINE)
    first = api.post("/api/v1/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="create-1")
    again = api.post("/api/v1/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="create-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true" and not first.has_header("Idempotent-Replayed")
    assert Job.objects.count() == 1


def test_a_repeated_multipart_upload_is_recognised_by_its_content(api):
    fields = job_body(deadline=DEADLINE)
    fields.pop("inputs")

    def upload(body: bytes):
        return api.post("/api/v1/jobs/", {**fields, "inputs": io.BytesIO(body)}, format="multipart",
                        HTTP_IDEMPOTENCY_KEY="upload-1")

    rows = jsonl([{"text": "one"}, {"text": "two"}])
    first = upload(rows)
    assert first.status_code == 201 and upload(rows).json() == first.json() and Job.objects.count() == 1
    assert_error(upload(rows + b'{"text": "three"}\n'), 422, "idempotency_key_reused")
    assert Job.objects.count() == 1


def test_the_same_key_with_another_body_or_endpoint_is_refused_and_does_nothing(api, make_job):
    assert post_job(api, "k1").status_code == 201
    error = assert_error(post_job(api, "k1", max_price_micros=3_000_000), 422, "idempotency_key_reused")
    assert "another request" in error["message"]
    job = Job.objects.get()
    assert_error(api.post(f"/api/v1/jobs/{job.pk}/cancel/", HTTP_IDEMPOTENCY_KEY="k1"), 422, "idempotency_key_reused")
    job.refresh_from_db()
    assert Job.objects.count() == 1 and job.state == "queued" and job.max_price_micros == 2_000_000


def test_an_error_response_is_replayed_too_and_its_work_is_not_done(api):
    bad = [{"text": "fine"}, {"text": ""}]
    first = post_job(api, "bad-1", inputs=bad)
    again = post_job(api, "bad-1", inputs=bad)
    assert first.status_code == again.status_code == 400 and again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true" and Job.objects.count() == 0


def test_keys_belong_to_the_organisation_not_to_one_api_key(api, buyer):
    # Another key of the same organisation replays; another organisation's same key is its own.
    first = post_job(api, "shared").json()
    assert post_job(key_client(buyer.organisation), "shared").json() == first
    other = post_job(key_client(BuyerFactory().organisation), "shared")
    assert other.status_code == 201 and other.json()["id"] != first["id"]
    assert Job.objects.count() == 2


def test_commands_replay_without_acting_again(api, make_job):
    job = make_job()
    first = api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": 3_000_000}, format="json", HTTP_IDEMPOTENCY_KEY="bid-1")
    api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": 4_000_000}, format="json")  # a later change, no key
    again = api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": 3_000_000}, format="json", HTTP_IDEMPOTENCY_KEY="bid-1")
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    job.refresh_from_db()
    assert job.max_price_micros == 4_000_000  # the repeat did not set the bid back


def test_a_key_expires_after_24_hours(api):
    body = job_body(deadline=DEADLINE)
    first = api.post("/api/v1/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="day-1").json()
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=24, seconds=1))
    again = api.post("/api/v1/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="day-1")
    assert again.status_code == 201 and again.json()["id"] != first["id"] and not again.has_header("Idempotent-Replayed")
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(hours=25))
    assert idempotency.idempotency_keys_purge() == 1 and IdempotencyKey.objects.count() == 0


def test_a_repeat_while_the_first_runs_gets_409_with_retry_after(api, buyer):
    body = job_body(deadline=DEADLINE)
    IdempotencyKey.objects.create(scope=f"org:{buyer.organisation_id}", key="busy", lock="first",
                                  fingerprint=_fingerprint(body), path="POST /api/v1/jobs/",
                                  locked_at=timezone.now(), created_at=timezone.now())
    response = api.post("/api/v1/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="busy")
    assert_error(response, 409, "idempotency_key_in_progress")
    assert response["Retry-After"] == "1" and Job.objects.count() == 0


def test_a_claim_left_by_a_crashed_request_is_taken_over_and_the_crashed_work_cannot_commit(buyer):
    # Given a claim whose request died (its lock is older than IDEMPOTENCY_LOCK_S),
    claim = dict(scope="org:1", key="k", fingerprint="f" * 64, path="POST /api/v1/jobs/")
    crashed, claimed = idempotency.idempotency_claim(**claim)
    assert claimed
    IdempotencyKey.objects.update(locked_at=timezone.now() - timedelta(hours=1))
    # when the retry claims the key, it takes it over,
    retry, claimed = idempotency.idempotency_claim(**claim)
    assert claimed and retry.pk == crashed.pk and retry.lock != crashed.lock
    # and should the first request wake up, it cannot complete (its transaction, work included, rolls back).
    with pytest.raises(Conflict):
        idempotency.idempotency_complete(record=crashed, status=201, body={})
    idempotency.idempotency_complete(record=retry, status=201, body={"id": 7})
    replay, claimed = idempotency.idempotency_claim(**claim)
    assert not claimed and replay.response_body == {"id": 7}


def test_a_server_error_releases_the_key_so_that_a_retry_runs(api, make_job, monkeypatch):
    job = make_job()

    def broken(**kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(flows, "job_cancel", broken)
    with pytest.raises(RuntimeError):
        api.post(f"/api/v1/jobs/{job.pk}/cancel/", HTTP_IDEMPOTENCY_KEY="c-1")
    assert IdempotencyKey.objects.count() == 0
    monkeypatch.undo()
    response = api.post(f"/api/v1/jobs/{job.pk}/cancel/", HTTP_IDEMPOTENCY_KEY="c-1")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve"])
def test_a_malformed_key_is_a_400(api, key):
    assert "Idempotency-Key" in assert_error(post_job(api, key), 400, "invalid")["fields"]
    assert Job.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_duplicates_create_one_job():
    # Given one organisation's request sent four times at once with one key,
    buyer = BuyerFactory()
    body = job_body(deadline=DEADLINE)
    clients = [key_client(buyer.organisation, buyer) for _ in range(4)]
    start = threading.Barrier(len(clients))
    answers = []

    def send(client):
        start.wait()
        try:
            answers.append(client.post("/api/v1/jobs/", body, format="json", HTTP_IDEMPOTENCY_KEY="race"))
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # then one job exists; every answer is that job, or a 409 asking to retry while it was being created.
    assert Job.objects.count() == 1
    job_id = Job.objects.get().pk
    for answer in answers:
        assert (answer.status_code, answer.json().get("id")) == (201, job_id) or answer.status_code == 409, answer.content
    assert sum(a.status_code == 201 for a in answers) >= 1 and len(answers) == 4


def _fingerprint(body: dict) -> str:
    """The fingerprint the server computes for a POST of ``body`` to /api/v1/jobs/."""
    request = Request(APIRequestFactory().post("/api/v1/jobs/", body, format="json"), parsers=[JSONParser()])
    return idempotency.request_fingerprint(request)


# Owner endpoints that answer with a new secret (a pairing code, a device token) are left out on purpose: the
# stored first response would keep the secret in the database for 24 hours, and a repeat is harmless (it
# issues a fresh secret and voids the last). Pairing is unauthenticated and its code works once.
OWNER_POSTS_WITHOUT_KEYS = {"PairApi", "PairingCodeApi", "TokenRotateApi"}


def test_every_other_post_of_the_owner_api_honours_the_idempotency_key():
    from fleet import api as fleet_api

    views = [p.callback.view_class for p in urls.api_v1 if isinstance(p, URLPattern)]
    posts = [view for view in views if view.__module__ == fleet_api.__name__ and hasattr(view, "post")]
    keyed = [view.__name__ for view in posts if getattr(view.post, "idempotent", False)]
    assert sorted(keyed) == sorted(v.__name__ for v in posts if v.__name__ not in OWNER_POSTS_WITHOUT_KEYS)
    assert len(keyed) >= 4


def test_an_owner_adding_a_car_twice_with_one_key_gets_one_car(client):
    from fleet.models import Vehicle
    from tests.factories import OwnerFactory

    owner = OwnerFactory()
    client.force_login(owner)
    headers = {"HTTP_IDEMPOTENCY_KEY": "add-blue-car"}
    first = client.post("/api/v1/vehicles/", {"name": "Blue", "hardware": "HW4"}, content_type="application/json", **headers)
    again = client.post("/api/v1/vehicles/", {"name": "Blue", "hardware": "HW4"}, content_type="application/json", **headers)
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert again["Idempotent-Replayed"] == "true"
    assert Vehicle.objects.filter(owner=owner).count() == 1
