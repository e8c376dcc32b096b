"""The buyer REST API: authentication and scoping, jobs, bids, results, rounds, the catalogue, the schema; errors
in one stable shape."""

import base64
import io
import json
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from fleet.models import WorkUnit
from marketplace import corpus, flows, services
from marketplace.core.errors import ValidationFailed
from marketplace.models import Allocation, AuctionRound, Job
from tests.conftest import jsonl
from tests.factories import BuyerFactory, OwnerFactory, VehicleFactory, future
from tests.support.capacity import deliver

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
    assert_error(api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": 1}, format="json"), 404, "not_found")
    assert api.get("/api/v1/jobs/").json()["results"] == []
    job.refresh_from_db()
    assert (job.state, job.max_price_micros) == ("queued", 2_000_000)


def test_cancel_stops_a_job_and_cancels_its_queued_units(api, make_job):
    job = make_job(docs=24)
    response = api.post(f"/api/v1/jobs/{job.pk}/cancel/")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert set(job.units.values_list("state", flat=True)) == {"cancelled"}


def test_the_openapi_schema_lists_every_endpoint_and_validates(client, tmp_path):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    assert {"/api/v1/jobs/", "/api/v1/jobs/{id}/bid/", "/api/v1/jobs/{id}/results/", "/api/v1/rounds/",
            "/api/v1/webhooks/", "/api/v1/webhooks/{id}/deliveries/", "/api/v1/fleet/pair/", "/api/v1/models/"} <= set(schema["paths"])
    create = schema["paths"]["/api/v1/jobs/"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(create["requestBody"]["content"])
    assert "Idempotency-Key" in [p["name"] for p in create["parameters"]]
    assert {"201", "400", "422", "429"} <= set(create["responses"])
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))


def test_the_interactive_viewers_are_served_with_their_own_assets(client):
    for page, asset in (("/api/docs/", "swagger-ui-dist/swagger-ui-bundle.js"), ("/api/redoc/", "redoc/bundles/redoc.standalone.js")):
        html = client.get(page).content.decode()
        assert f"/static/drf_spectacular_sidecar/{asset}" in html and "cdn" not in html.lower()
        assert client.get(f"/static/drf_spectacular_sidecar/{asset}").status_code == 200


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


# --- authentication and scoping ------------------------------------------------------------------------

def client_with(key: str):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def test_an_owners_key_is_not_a_buyers(db):
    owner = OwnerFactory()
    _, key = services.api_key_create(organisation=None, name="own cars", created_by=owner)
    owner_api = client_with(key)
    assert_error(owner_api.get("/api/v1/jobs/"), 403, "permission_denied")
    assert_error(owner_api.post("/api/v1/webhooks/", {"url": "https://example.com/h"}, format="json"), 403,
                 "permission_denied")


def test_a_key_acts_for_its_own_organisation_even_after_its_creator_moves(api, buyer, make_job):
    # Given a job of the key's organisation, and its creator since moved to another organisation,
    job = make_job()
    elsewhere = BuyerFactory().organisation
    other_job = make_job(organisation=elsewhere)
    buyer.organisation = elsewhere
    buyer.save(update_fields=["organisation"])
    # then the key still sees its organisation's jobs, and only those.
    assert [j["id"] for j in api.get("/api/v1/jobs/").json()["results"]] == [job.pk]
    assert_error(api.get(f"/api/v1/jobs/{other_job.pk}/"), 404, "not_found")


def test_a_key_of_a_deactivated_member_is_refused(api, buyer):
    buyer.is_active = False
    buyer.save(update_fields=["is_active"])
    assert_error(api.get("/api/v1/jobs/"), 401, "authentication_failed")


# --- creating jobs -------------------------------------------------------------------------------------

def job_body(**overrides) -> dict:
    return {"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": 2_000_000,
            "deadline": (timezone.now() + timedelta(hours=2)).isoformat(), "inputs": corpus.documents(20), **overrides}


def test_a_json_body_creates_a_job_like_an_upload(api):
    response = api.post("/api/v1/jobs/", job_body(), format="json")
    assert response.status_code == 201, response.content
    job = Job.objects.get(pk=response.json()["id"])
    assert (job.docs_total, job.units_total) == (20, 3)
    assert job.units.get(seq=2).inputs[-1] == {"id": "doc-000019", "text": corpus.documents(20)[19]["text"]}


def test_bad_documents_of_a_json_body_are_reported_by_position_and_nothing_is_created(api):
    inputs = [{"text": "fine"}, {"text": ""}, "just a string", {"text": "ok", "id": [1]}, {"text": "last"}]
    error = assert_error(api.post("/api/v1/jobs/", job_body(inputs=inputs), format="json"), 400, "invalid_inputs")
    assert [row["line"] for row in error["lines"]] == [2, 3, 4]
    assert Job.objects.count() == 0


def test_a_json_body_over_the_limit_is_refused_unread_with_413(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    assert_error(api.post("/api/v1/jobs/", job_body(inputs=corpus.documents(100)), format="json"), 413, "too_large")
    assert Job.objects.count() == 0


def test_an_upload_too_large_for_memory_is_spooled_to_disk_and_read_line_by_line(api, settings):
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 1024  # every upload of this test goes to a temporary file
    response = post_job(api, body=jsonl(corpus.documents(40)))
    assert response.status_code == 201, response.content
    assert Job.objects.get().docs_total == 40


def test_inputs_of_over_100_mb_are_read_with_bounded_memory_and_bad_lines_found_anywhere(buyer, tmp_path):
    # Given a 100 MB JSON Lines file: a bad first line, 1,600 good lines of 64 kB and a 20 MB last line,
    path = tmp_path / "big.jsonl"
    good = json.dumps({"text": "x" * 64_000}).encode() + b"\n"
    with path.open("wb") as f:
        f.write(b"{not json\n")
        for _ in range(1_600):
            f.write(good)
        f.write(b'{"text": "' + b"y" * 20_000_000 + b'"}\n')
    assert path.stat().st_size > 100_000_000
    # when a job is created from it,
    tracemalloc.start()
    try:
        with path.open("rb") as inputs, pytest.raises(ValidationFailed) as refused:
            flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                                precision="int8", max_price_micros=1, deadline=future(), inputs=inputs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # then both bad lines are reported by number, nothing is created, and memory stayed far below the file's size.
    assert [row["line"] for row in refused.value.extra["lines"]] == [1, 1_602]
    assert "longer than" in refused.value.extra["lines"][1]["message"]
    assert Job.objects.count() == 0
    assert peak < 4_000_000, peak


# --- listing jobs --------------------------------------------------------------------------------------

def test_jobs_are_listed_newest_first_filtered_and_paginated(api, make_job):
    old, cancelled, fp32 = make_job(), make_job(), make_job(precision="fp32")
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=3))
    flows.job_cancel(job=cancelled)

    def ids(query: str = "") -> list[int]:
        response = api.get(f"/api/v1/jobs/{query}")
        assert response.status_code == 200, response.content
        return [job["id"] for job in response.json()["results"]]

    assert ids() == [fp32.pk, cancelled.pk, old.pk]
    page = api.get("/api/v1/jobs/?limit=2&offset=1").json()
    assert page["count"] == 3 and [j["id"] for j in page["results"]] == [cancelled.pk, old.pk] and page["next"] is None
    assert ids("?state=cancelled") == [cancelled.pk]
    assert ids("?state=queued,cancelled") == [fp32.pk, cancelled.pk, old.pk]
    assert ids("?model=all-minilm-l6-v2&state=queued") == [fp32.pk, old.pk]
    assert ids("?model=another-model") == []
    day_ago = (timezone.now() - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    assert ids(f"?created_after={day_ago}") == [fp32.pk, cancelled.pk]
    assert ids(f"?created_before={day_ago}") == [old.pk]


@pytest.mark.parametrize("query, field", [("state=done", "state"), ("created_after=yesterday", "created_after"),
                                          ("model=not a slug", "model")])
def test_bad_job_filters_get_a_400_naming_the_field(api, query, field):
    assert field in assert_error(api.get(f"/api/v1/jobs/?{query}"), 400, "invalid")["fields"]


# --- bids ----------------------------------------------------------------------------------------------

def test_a_buyer_raises_and_lowers_the_bid_of_an_open_job(api, make_job):
    job = make_job(price=2_000_000)
    for price in (3_000_000, 500_000):
        response = api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": price}, format="json")
        assert response.status_code == 200, response.content
        assert response.json()["max_price_micros"] == price
        job.refresh_from_db()
        assert job.max_price_micros == price


def test_lowering_a_bid_gives_up_the_capacity_won_above_it(api, make_job):
    # Given a job that won a car's capacity at the round's clearing price,
    job = make_job(price=2_000_000)
    VehicleFactory()
    flows.auction_tick()
    allocation = Allocation.objects.get(job=job)
    assert allocation.remaining_mops > 0
    # when the buyer lowers the bid, first to the clearing price, then below it,
    api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": allocation.price_micros}, format="json")
    allocation.refresh_from_db()
    assert allocation.remaining_mops > 0
    api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": allocation.price_micros - 1}, format="json")
    # then no more work is leased under a price over the bid.
    allocation.refresh_from_db()
    assert allocation.remaining_mops == 0


def test_the_bid_of_a_closed_job_cannot_change(api, make_job):
    job = make_job()
    flows.job_cancel(job=job)
    assert_error(api.post(f"/api/v1/jobs/{job.pk}/bid/", {"max_price_micros": 5}, format="json"), 409, "job_closed")


@pytest.mark.parametrize("price", [0, -1, "cheap", 10**12 + 1, None])
def test_a_bad_bid_is_a_400_naming_the_field(api, make_job, price):
    job = make_job()
    body = {} if price is None else {"max_price_micros": price}
    error = assert_error(api.post(f"/api/v1/jobs/{job.pk}/bid/", body, format="json"), 400, "invalid")
    assert "max_price_micros" in error["fields"]


# --- results -------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume asynchronous iterators")
def test_results_are_streamed_as_json_lines_in_input_order(api, make_job):
    job = make_job(docs=20)
    unit = job.units.get(seq=1)
    vectors = [np.eye(job.ai_model.dims, dtype="<f4")[i] for i in range(len(unit.inputs))]
    WorkUnit.objects.filter(pk=unit.pk).update(state="done", result=[base64.b64encode(v.tobytes()).decode() for v in vectors])
    response = api.get(f"/api/v1/jobs/{job.pk}/results/")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in b"".join(response).splitlines()]  # WSGI: the async stream, consumed
    assert [(r["index"], r["id"]) for r in rows] == [(i, f"doc-{i:06d}") for i in range(20)]
    assert [r.get("error") for r in rows[:8]] == ["not computed"] * 8
    assert rows[8]["embedding"][0] == 1.0 and rows[9]["embedding"][1] == 1.0 and "error" not in rows[15]


# --- rounds and the catalogue --------------------------------------------------------------------------

ROUND_FIELDS = {"id", "market", "cleared_at", "interval_s", "clearing_price_micros", "offered_mops", "demanded_mops",
                "sold_mops"}


def test_rounds_give_prices_and_volumes_and_never_a_bid_a_buyer_or_a_job(api, make_job):
    # Given two rounds where a job traded, and a round where nothing did,
    job = make_job(price=2_345_678)
    deliver(VehicleFactory(), mops_per_s=50_000)  # proven: more capacity than the job wants, so its bid is not the price
    (first,) = flows.auction_tick()
    # (the first round's allocation, left unused, would cost the car standing in the second: it is older)
    AuctionRound.objects.update(cleared_at=timezone.now() - timedelta(seconds=settings.CAPACITY_STANDING_WINDOW_S + 1))
    (second,) = flows.auction_tick()
    AuctionRound.objects.create(market="fp32", cleared_at=timezone.now(), interval_s=2.0)
    # then each round shows its price and volumes, and nothing else,
    response = api.get("/api/v1/rounds/")
    assert response.status_code == 200
    rows = response.json()["results"]
    assert all(set(row) == ROUND_FIELDS for row in rows) and len(rows) == 3
    assert str(job.max_price_micros) not in response.content.decode() and job.organisation.name not in response.content.decode()
    traded = api.get("/api/v1/rounds/?market=int8&traded=true").json()["results"]
    assert [r["id"] for r in traded] == [second.pk, first.pk]
    assert traded[0]["clearing_price_micros"] == second.clearing_price_micros and traded[0]["sold_mops"] > 0
    assert [r["market"] for r in api.get("/api/v1/rounds/?traded=false").json()["results"]] == ["fp32"]
    # and `since` gives only the rounds cleared after it.
    since = first.cleared_at.isoformat().replace("+00:00", "Z")
    assert api.get(f"/api/v1/rounds/?market=int8&since={since}").json()["count"] == (0 if second.cleared_at == first.cleared_at else 1)
    page = api.get("/api/v1/rounds/?limit=1").json()
    assert page["count"] == 3 and len(page["results"]) == 1 and page["next"]


def test_rounds_need_credentials_and_valid_filters(api):
    from rest_framework.test import APIClient

    assert_error(APIClient().get("/api/v1/rounds/"), 401, "not_authenticated")
    assert "market" in assert_error(api.get("/api/v1/rounds/?market=fp64"), 400, "invalid")["fields"]
    assert "since" in assert_error(api.get("/api/v1/rounds/?since=last-week"), 400, "invalid")["fields"]


def test_the_catalogue_is_public_and_marks_each_workloads_default_model(client):
    models = client.get("/api/v1/models/").json()
    assert {(m["task"], m["slug"]) for m in models if m["default"]} == {
        ("embedding", "all-minilm-l6-v2"), ("classification", "minilm-l6-classifier"), ("ocr", "rapidocr-pp-ocrv4")}
    by_slug = {m["slug"]: m for m in models}
    assert set(by_slug["all-minilm-l6-v2"]["price_per_million_tokens_micros"]) == {"int8", "fp32"}
    assert by_slug["all-minilm-l6-v2"]["price_unit"] == {"name": "token", "per": 1_000_000, "label": "per million tokens"}
    # A model priced per page has its prices per thousand pages, and none per million tokens.
    ocr = by_slug["rapidocr-pp-ocrv4"]
    assert ocr["price_unit"]["label"] == "per thousand pages" and set(ocr["price_per_unit_micros"]) == {"fp32"}
    assert ocr["price_per_million_tokens_micros"] is None


def test_a_body_nested_too_deep_is_a_400_in_the_apis_error_shape_not_a_500(api, make_job):
    job = make_job(docs=8)
    deep = "[" * 30_000 + "]" * 30_000
    response = api.generic("POST", f"/api/v1/jobs/{job.pk}/bid/", deep, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "parse_error"
