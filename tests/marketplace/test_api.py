"""The buyer REST API: jobs, errors in one stable shape, scoping."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from fleet.models import WorkUnit
from marketplace import corpus, services
from marketplace.models import Job
from tests.conftest import jsonl
from tests.factories import BuyerFactory

pytestmark = pytest.mark.django_db


def post_job(api, *, body: bytes | None = None, **overrides):
    data = {"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": 2_000_000,
            "deadline": (timezone.now() + timedelta(hours=2)).isoformat(),
            "inputs": io.BytesIO(body if body is not None else jsonl(corpus.documents(20)))}
    data.update(overrides)
    return api.post("/api/v1/jobs/", data, format="multipart")


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_a_buyer_creates_a_job_and_its_inputs_are_split_into_units(api):
    response = post_job(api)
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert (job.docs_total, job.units_total, job.state) == (20, 3, "queued")
    units = list(job.units.order_by("seq"))
    assert [len(u.inputs) for u in units] == [8, 8, 4]
    assert units[0].inputs[0]["id"] == "doc-000000" and units[2].inputs[-1]["id"] == "doc-000019"
    assert job.tokens_total == sum(u.tokens for u in units) > 20
    assert response.json()["max_price_per_million_tokens_micros"] > 0


def test_a_malformed_jsonl_upload_is_refused_with_the_line_numbers_and_nothing_is_created(api):
    body = b'{"text": "fine"}\nnot json\n{"text": ""}\n\n[1, 2]\n{"text": "ok", "id": {"x": 1}}\n{"text": "last"}\n'
    error = assert_error(post_job(api, body=body), 400, "invalid_inputs")
    assert [row["line"] for row in error["lines"]] == [2, 3, 5, 6]
    assert error["bad_line_count"] == 4
    assert Job.objects.count() == 0 and WorkUnit.objects.count() == 0


def test_an_empty_upload_is_refused(api):
    assert_error(post_job(api, body=b"\n\n"), 400, "invalid_inputs")


@pytest.mark.parametrize("overrides, field", [
    ({"model": "gpt-17"}, "model"),
    ({"precision": "fp16"}, "precision"),
    ({"max_price_micros": -5}, "max_price_micros"),
    ({"deadline": "2001-01-01T00:00:00Z"}, "deadline"),
])
def test_bad_job_parameters_get_a_400_naming_the_field(api, overrides, field):
    error = assert_error(post_job(api, **overrides), 400, "invalid")
    assert field in error["fields"]
    assert Job.objects.count() == 0


def test_a_missing_field_gets_the_same_error_shape(api):
    error = assert_error(api.post("/api/v1/jobs/", {"model": "all-minilm-l6-v2"}, format="multipart"), 400, "invalid")
    assert {"precision", "deadline", "inputs", "max_price_micros"} <= set(error["fields"])


def test_requests_without_a_valid_key_are_refused(client, api_key, api):
    from rest_framework.test import APIClient

    assert_error(APIClient().get("/api/v1/jobs/"), 401, "not_authenticated")
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Bearer mk_00000000_nope")
    assert_error(bad.get("/api/v1/jobs/"), 401, "authentication_failed")
    key = services.api_key_authenticate(secret=api_key)
    services.api_key_revoke(key=key)
    assert_error(api.get("/api/v1/jobs/"), 401, "authentication_failed")


def test_another_organisations_job_is_not_found(api, make_job):
    other = BuyerFactory()
    job = make_job(organisation=other.organisation)
    assert_error(api.get(f"/api/v1/jobs/{job.pk}/"), 404, "not_found")
    assert_error(api.get(f"/api/v1/jobs/{job.pk}/results/"), 404, "not_found")
    assert_error(api.post(f"/api/v1/jobs/{job.pk}/cancel/"), 404, "not_found")
    assert api.get("/api/v1/jobs/").json() == []


def test_cancel_stops_a_job_and_cancels_its_queued_units(api, make_job):
    job = make_job(docs=24)
    response = api.post(f"/api/v1/jobs/{job.pk}/cancel/")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert set(job.units.values_list("state", flat=True)) == {"cancelled"}


def test_the_openapi_schema_lists_the_endpoints(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"/api/v1/jobs/", "/api/v1/jobs/{id}/results/", "/api/v1/fleet/pair/", "/api/v1/models/"} <= set(paths)


def test_issue_api_key_creates_a_buyer_and_prints_a_working_key_last():
    out = io.StringIO()
    call_command("issue_api_key", "new-buyer@example.com", stdout=out, stderr=io.StringIO())
    key = out.getvalue().strip().splitlines()[-1]
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.get("/api/v1/jobs/").status_code == 200


def test_healthz_answers_json(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"
