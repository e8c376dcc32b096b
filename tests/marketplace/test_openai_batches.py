"""The OpenAI-compatible Files and Batches API (``/v1/``), driven by the official ``openai`` client, unmodified,
against the live product server (marketplace.openai_api; docs/api.md, "OpenAI-compatible batches").

One server serves the module (starting one takes seconds); each test makes its own buyers. The last test
pairs two real car agents, which compute a batch end to end."""

import base64
import io
import json
import sys
import threading
import time
from datetime import timedelta

import httpx
import numpy as np
import openai
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import LedgerTransaction, MeterRecord, Reservation
from billing.money import femto_per_minor, femto_to_minor_ceil, price_micros_for_per_units
from billing.selectors import account_balance_minor, unbalanced_transaction_ids
from billing.services import account_get
from fleet import services as fleet
from fleet import workloads
from fleet.agent.models import get_runner
from fleet.agent.pages import error_rate
from fleet.models import HardwareGeneration, WorkUnit
from marketplace import batches, buyer_webhooks, corpus, flows, selectors, services
from marketplace.core.errors import Conflict
from marketplace.models import AIModel, AuctionRound, Batch, BatchFile, BuyerWebhookEvent, Job
from tests.factories import BuyerFactory, OwnerFactory, VehicleFactory
from tests.marketplace.test_classification import CLASSIFIER
from tests.marketplace.test_classification import DOCUMENTS as CLASSIFIED
from tests.marketplace.test_classification import LABELS as CLASSIFIER_LABELS
from tests.marketplace.test_api_webhooks import complete_units
from tests.support.capacity import deliver
from tests.support.live import live_product

# The live server reads what the tests write: the tests against it commit (the pure ones need no database).
live_db = pytest.mark.django_db(transaction=True)

MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def live(django_db_setup, tmp_path_factory):
    """The product on the active profile, on loopback against the test database: (base_url, processes)."""
    with live_product(tmp_path_factory.mktemp("openai-live"), AUCTION_INTERVAL_S="0.5",
                      BATCH_FINALIZE_INTERVAL_S="0.5") as running:
        yield running


def client_for(base: str, organisation=None, **buyer) -> tuple[openai.OpenAI, object]:
    """The official client for a new buyer's API key (``max_retries=0``: a failure shows at once)."""
    user = BuyerFactory(**buyer) if organisation is None else BuyerFactory(organisation=organisation)
    _, key = services.api_key_create(organisation=user.organisation, name="openai", created_by=user)
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30), user


def request_line(custom_id: str, text, model: str = MODEL, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": model, "input": text, **body}}


def upload(client: openai.OpenAI, rows: list, name: str = "requests.jsonl"):
    content = b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)
    return client.files.create(file=(name, content), purpose="batch")


def error_lines(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


# --- pure: the file format ------------------------------------------------------------------------------

MODELS = {MODEL: workloads.ModelInfo(slug=MODEL, task="embedding", runtime=MODEL, dims=384, max_tokens=256)}


@pytest.mark.pure
def test_each_bad_line_is_reported_by_its_number_and_the_good_lines_are_kept():
    # Given a file with good lines and one of each kind of bad line,
    lines = [json.dumps(row).encode() for row in [
        request_line("a", "first"),
        request_line("a", "duplicate id"),
        {**request_line("b", "wrong url"), "url": "/v1/chat/completions"},
        request_line("c", "not ours", model="text-embedding-3-small"),
        request_line("d", ["two", "texts"], encoding_format="base64"),
        request_line("e", "", ),
        request_line("f", "dims", dimensions=256),
    ]] + [b"", b"{not json", json.dumps(request_line("g", [1, 2, 3])).encode()]
    # when it is parsed,
    parsed = batches.parse(lines, endpoint="/v1/embeddings", models=MODELS, max_text_bytes=64 * 1024)
    # then the good requests run, in order, and every bad line is named by its number with OpenAI's codes
    assert [(r.line, r.custom_id, r.texts, r.options) for r in parsed.requests] == [
        (1, "a", ["first"], {"encoding_format": "float"}), (5, "d", ["two", "texts"], {"encoding_format": "base64"})]
    assert [(e.line, e.code) for e in parsed.errors] == [
        (2, "duplicate_custom_id"), (3, "mismatched_endpoint"), (4, "model_not_found"), (6, "invalid_input"),
        (7, "unsupported_dimensions"), (9, "invalid_json"), (10, "invalid_input")]
    assert parsed.model == MODEL and parsed.total == 9 and not parsed.file_errors
    # and a list input is one document per string, named after its custom_id.
    assert batches.document_ids(parsed.requests[1]) == ["d[0]", "d[1]"]


@pytest.mark.pure
def test_a_file_fails_whole_only_without_a_valid_request_or_with_too_many(monkeypatch):
    parsed = batches.parse([json.dumps(request_line("x", "t", model="text-embedding-3-small")).encode()],
                           endpoint="/v1/embeddings", models=MODELS, max_text_bytes=65536)
    assert [e.code for e in parsed.file_errors] == ["no_valid_requests"] and parsed.errors[0].code == "model_not_found"
    monkeypatch.setattr(batches, "MAX_REQUESTS", 2)
    rows = [json.dumps(request_line(str(i), "t")).encode() for i in range(3)]
    parsed = batches.parse(rows, endpoint="/v1/embeddings", models=MODELS, max_text_bytes=65536)
    assert [e.code for e in parsed.file_errors] == ["too_many_requests"]


@pytest.mark.pure
def test_a_base64_output_line_is_little_endian_float32_and_a_float_one_the_same_numbers():
    vector = np.array([0.25, -1.5, 3.0], dtype="<f4")
    encoded = base64.b64encode(vector.tobytes()).decode()
    embedding = workloads.get("embedding")

    def line(encoding_format):
        body = embedding.batch_response([encoded], options={"encoding_format": encoding_format}, params={}, model=MODEL,
                                        usage=3)
        return batches.output_line(batch_id="batch_x", line=1, custom_id="a", body=body)

    as_b64, as_float = line("base64"), line("float")
    assert as_b64["response"]["body"]["data"][0]["embedding"] == encoded
    assert as_float["response"]["body"]["data"][0]["embedding"] == [0.25, -1.5, 3.0]
    assert as_b64["id"].startswith("batch_req_") and as_b64["error"] is None
    assert as_b64["response"]["status_code"] == 200
    assert as_b64["response"]["body"]["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


# --- live: the official client against the server -------------------------------------------------------

@live_db
def test_files_are_created_listed_read_and_deleted_by_the_official_client_and_scoped_to_the_organisation(live):
    base, _ = live
    client, buyer = client_for(base)
    rows = [request_line("a", "hello"), request_line("b", ["x", "y"])]
    # Given a file uploaded with files.create(purpose="batch"),
    created = upload(client, rows, name="mine.jsonl")
    # then it has OpenAI's shape and ids, and retrieve, list and content agree with it;
    assert created.id.startswith("file-") and created.object == "file" and created.purpose == "batch"
    assert created.filename == "mine.jsonl" and isinstance(created.created_at, int) and created.bytes > 0
    assert client.files.retrieve(created.id).model_dump() == created.model_dump()
    assert created.expires_at - created.created_at == 30 * 24 * 3600  # the default retention, as OpenAI's
    short = client.files.create(file=("short.jsonl", b"{}\n"), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 3600})
    assert short.expires_at - short.created_at == 3600
    client.files.delete(short.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at",
                                                                                      "seconds": 60})
    assert caught.value.body["param"] == "expires_after"
    others = [upload(client, rows, name=f"f{i}.jsonl") for i in range(3)]
    listed = client.files.list(limit=2)
    assert [f.id for f in listed.data] == [others[2].id, others[1].id] and listed.has_more
    assert [f.id for f in listed] == [f.id for f in reversed([created, *others])]  # auto-pagination
    assert [json.loads(line) for line in client.files.content(created.id).text.splitlines()] == rows
    # and another organisation sees none of it (404 in OpenAI's shape),
    stranger, _ = client_for(base)
    with pytest.raises(openai.NotFoundError) as caught:
        stranger.files.retrieve(created.id)
    assert caught.value.body == {"message": "No such object.", "type": "invalid_request_error", "param": None,
                                 "code": "not_found"}
    assert [f.id for f in stranger.files.list()] == []
    with pytest.raises(openai.NotFoundError):
        stranger.files.content(created.id)
    with pytest.raises(openai.NotFoundError):
        stranger.files.delete(created.id)
    # and a colleague's key of the same organisation sees it;
    colleague, _ = client_for(base, organisation=buyer.organisation)
    assert colleague.files.retrieve(created.id).id == created.id
    # and once deleted it is gone, content and all.
    deleted = client.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.content(created.id)
    # A purpose other than batch is refused.
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose" and caught.value.body["code"] == "invalid_purpose"


@live_db
def test_routes_answer_without_a_trailing_slash_with_openai_errors_and_list_our_models(live):
    base, _ = live
    client, _ = client_for(base)
    # The catalogue as OpenAI's model list,
    models = client.models.list()
    assert MODEL in [m.id for m in models] and all(m.object == "model" for m in models)
    # every route without (and with) a trailing slash, never a redirect,
    key = client.api_key
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, follow_redirects=False)
    for path in ("/v1/models", "/v1/models/", "/v1/files", "/v1/files/", "/v1/batches", "/v1/batches/"):
        assert http.get(path).status_code == 200, path
    # and errors in OpenAI's shape: no key, a bad key, an unknown route, an unknown batch, a bad request.
    for response in (httpx.get(f"{base}/v1/files"),
                     httpx.get(f"{base}/v1/files", headers={"Authorization": "Bearer mk_00000000_nope"}),
                     http.get("/v1/embeddings/unknown"), http.get("/v1/batches/batch_nope"),
                     http.post("/v1/batches", json={"endpoint": "/v1/embeddings"})):
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and response.status_code in (400, 401, 404), error
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="mk_00000000_nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id="file-x", endpoint="/v1/completions", completion_window="24h")
    assert caught.value.body["param"] == "endpoint" and caught.value.body["code"] == "unsupported_endpoint"
    with pytest.raises(openai.NotFoundError) as caught:
        client.batches.create(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h")
    assert caught.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="2d")
    assert caught.value.body["param"] == "completion_window"


@live_db
def test_a_batch_with_bad_lines_runs_its_good_ones_and_its_error_file_names_the_bad_ones_by_line(live):
    base, _ = live
    client, buyer = client_for(base)
    # Given a file with two good requests, one naming OpenAI's model, one duplicate id and one for another url,
    rows = [request_line("good-1", "the first document"),
            request_line("openai-model", "served by nobody", model="text-embedding-3-small"),
            request_line("good-2", ["a list", "of two"]),
            request_line("good-1", "again"),
            {**request_line("chat", "hello"), "url": "/v1/chat/completions"}]
    file = upload(client, rows)
    # when a batch is made of it, with a bid and a precision in extra_body,
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"project": "tests"},
                                  output_expires_after={"anchor": "created_at", "seconds": 7200},
                                  extra_body={"max_price_per_million_tokens": 0.5, "precision": "fp32"})
    # then it is in progress as a job with the good requests' three documents, at the bid and precision asked,
    assert batch.id.startswith("batch_") and batch.status == "in_progress" and batch.metadata == {"project": "tests"}
    assert batch.request_counts.total == 5 and batch.request_counts.failed == 3
    assert batch.input_file_id == file.id and batch.completion_window == "24h"
    assert batch.expires_at - batch.created_at == 24 * 3600
    stored = Batch.objects.select_related("job").get(public_id=batch.id)
    job = stored.job
    assert (job.docs_total, job.precision, job.organisation_id) == (3, "fp32", buyer.organisation_id)
    assert list(job.units.order_by("seq").values_list("inputs", flat=True))[0][:3] == [
        {"id": "good-1", "text": "the first document"}, {"id": "good-2[0]", "text": "a list"},
        {"id": "good-2[1]", "text": "of two"}]
    assert job.max_price_micros == price_micros_for_per_units(per_units_micros=500_000, ops_per_unit=job.ai_model.ops_per_token, per=10**6)
    # and the same request again (the client sends no Idempotency-Key) is the same batch, not a second job;
    again = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h",
                                  metadata={"project": "tests"},
                                  output_expires_after={"anchor": "created_at", "seconds": 7200},
                                  extra_body={"max_price_per_million_tokens": 0.5, "precision": "fp32"})
    assert again.id == batch.id and Job.objects.filter(organisation=buyer.organisation).count() == 1
    # when it is cancelled before any car computed it,
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.output_file_id is None
    # then its error file lists every request by its input line: the refused ones and the cancelled ones.
    errors = {(e["error"]["line"], e["custom_id"], e["error"]["code"]) for e in error_lines(client, cancelled.error_file_id)}
    assert errors == {(2, "openai-model", "model_not_found"), (4, "good-1", "duplicate_custom_id"),
                      (5, "chat", "mismatched_endpoint"), (1, "good-1", "batch_cancelled"),
                      (3, "good-2", "batch_cancelled")}
    assert client.batches.retrieve(batch.id).request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
    error_file = client.files.retrieve(cancelled.error_file_id)  # kept as output_expires_after said
    assert error_file.purpose == "batch_output" and error_file.expires_at - error_file.created_at == 7200
    assert Job.objects.get(pk=job.pk).state == Job.State.CANCELLED


@live_db
def test_a_file_of_only_unknown_models_makes_a_failed_batch_and_never_another_model(live):
    base, _ = live
    client, buyer = client_for(base)
    file = upload(client, [request_line("a", "text", model="text-embedding-3-small"),
                           request_line("b", "text", model="text-embedding-3-large")])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [e.code for e in batch.errors.data] == ["no_valid_requests", "model_not_found", "model_not_found"]
    assert [e.line for e in batch.errors.data] == [None, 1, 2]
    assert [e["error"]["code"] for e in error_lines(client, batch.error_file_id)] == ["model_not_found"] * 2
    assert not Job.objects.filter(organisation=buyer.organisation).exists()


@live_db
def test_batches_are_listed_newest_first_with_auto_pagination_and_scoped_to_the_organisation(live):
    base, _ = live
    client, buyer = client_for(base)
    file = upload(client, [request_line("a", "a document to embed")])
    # Given five batches (distinct metadata, so none is a repeat of another), without a bid: the default,
    made = [client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="1h",
                                  metadata={"n": str(i)}) for i in range(5)]
    default = Job.objects.filter(batch__public_id=made[0].id).get()
    assert default.max_price_micros == 1_000_000 and default.precision == "int8"  # no round yet: the fallback
    assert made[0].expires_at - made[0].created_at == 3600
    # the list pages with limit and after, as OpenAI's does, and the client's iterator walks every page;
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [made[4].id, made[3].id] and page.has_more
    assert page.model_dump()["first_id"] == made[4].id and page.model_dump()["last_id"] == made[3].id
    assert [b.id for b in client.batches.list(limit=2)] == [b.id for b in reversed(made)]
    assert [b.id for b in client.batches.list(limit=2, after=made[1].id)] == [made[0].id]
    # and another organisation sees none of them.
    stranger, _ = client_for(base)
    assert list(stranger.batches.list()) == []
    with pytest.raises(openai.NotFoundError):
        stranger.batches.retrieve(made[0].id)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.cancel(made[0].id)
    with pytest.raises(openai.NotFoundError):
        stranger.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
    for batch in made:
        assert client.batches.cancel(batch.id).status == "cancelled"


@live_db
def test_a_batch_without_the_balance_for_its_bid_is_refused_in_openai_shape(live):
    base, _ = live
    client, _ = client_for(base, organisation__credit=0)
    file = upload(client, [request_line("a", "text")])
    with pytest.raises(openai.APIStatusError) as caught:
        client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
    assert caught.value.status_code == 402 and caught.value.body["code"] == "insufficient_balance"
    assert caught.value.body["type"] == "insufficient_quota"


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@live_db
def test_batches_of_each_workload_are_computed_by_real_cars_and_match_the_reference_runtime(live, tmp_path):
    base, procs = live
    client, buyer = client_for(base)
    # Given two cars of two owners, their real agents paired and connected,
    hw4 = HardwareGeneration.objects.get(code="HW4")
    agents = []
    for i in range(2):
        vehicle, code = fleet.vehicle_create(owner=OwnerFactory(), name=f"Batch car {i}", hardware=hw4)
        fleet.policy_update(vehicle=vehicle, reserve_price_micros=1_000)
        agents.append(procs.start(f"batch-agent{i}", [
            sys.executable, "-m", "fleet.agent", "--server", base, "--pair", code, "--state-file",
            str(tmp_path / f"agent{i}.json"), "--battery", "85", "--plugged-in", "--wifi"], FLEET_ORT_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/healthz").json()["vehicles_connected"] < 2:
            assert time.monotonic() < deadline, procs.logs()
            time.sleep(0.3)
        # and a batch of twelve requests, in both encodings, one of them a list,
        docs = corpus.documents(13)
        rows = [request_line(f"doc-{i}", d["text"], encoding_format="base64" if i % 2 else "float")
                for i, d in enumerate(docs[:11])] + [request_line("pair", [docs[11]["text"], docs[12]["text"]])]
        file = upload(client, rows)
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h",
                                      extra_body={"max_price_per_million_tokens": 1})
        # when the cars compute it,
        deadline = time.monotonic() + 90
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired"):
            assert time.monotonic() < deadline, f"batch stuck: {batch}\n{procs.logs()}"
            time.sleep(0.5)
        # and a classification batch after it, through the same client (our endpoint, OpenAI's file format),
        labelled = [(f"c{i}", text, label) for i, (text, label) in enumerate(CLASSIFIED)]
        classification_file = upload(client, [
            {"custom_id": custom_id, "method": "POST", "url": "/v1/classifications",
             "body": {"model": CLASSIFIER, "input": text, "labels": CLASSIFIER_LABELS}}
            for custom_id, text, _ in labelled], name="classify.jsonl")
        classified = client.batches.create(input_file_id=classification_file.id, endpoint="/v1/classifications",
                                           completion_window="24h", extra_body={"max_price_per_million_tokens": 1})
        while (classified := client.batches.retrieve(classified.id)).status not in ("completed", "failed", "expired"):
            assert time.monotonic() < deadline + 60, f"batch stuck: {classified}\n{procs.logs()}"
            time.sleep(0.5)
        # and an OCR batch of page images (our endpoint, priced per thousand pages), one request of two pages,
        pages = corpus.page_documents(3)
        ocr_file = upload(client, [
            {"custom_id": "scan-1", "method": "POST", "url": "/v1/ocr",
             "body": {"model": "rapidocr-pp-ocrv4", "input": f"data:image/png;base64,{pages[0]['image']}"}},
            {"custom_id": "scan-2", "method": "POST", "url": "/v1/ocr",
             "body": {"model": "rapidocr-pp-ocrv4", "input": [pages[1]["image"], pages[2]["image"]]}}],
            name="scans.jsonl")
        read = client.batches.create(input_file_id=ocr_file.id, endpoint="/v1/ocr", completion_window="24h",
                                     extra_body={"max_price_per_thousand_pages": 1})
        while (read := client.batches.retrieve(read.id)).status not in ("completed", "failed", "expired"):
            assert time.monotonic() < deadline + 240, f"batch stuck: {read}\n{procs.logs()}"
            time.sleep(0.5)
    finally:
        for agent in agents:
            agent.terminate()
    # then it completed, every request counted, with usage, and no error file,
    assert batch.status == "completed" and batch.completed_at and batch.error_file_id is None, batch
    assert batch.request_counts.model_dump() == {"total": 12, "completed": 12, "failed": 0}
    assert batch.usage.input_tokens == Job.objects.get(batch__public_id=batch.id).tokens_total > 0
    # and the output file holds one line per request in OpenAI's shape, in input order,
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [row["custom_id"] for row in rows]
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in lines)
    assert all(set(line) == {"id", "custom_id", "response", "error"} for line in lines)
    assert all(line["response"]["body"]["object"] == "list" and line["response"]["body"]["model"] == MODEL
               for line in lines)
    # with embeddings equal to the same model run directly (base64: little-endian float32),
    vectors = []
    for line in lines:
        for item in line["response"]["body"]["data"]:
            value = item["embedding"]
            vectors.append(np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str)
                           else np.array(value))
    assert [isinstance(line["response"]["body"]["data"][0]["embedding"], str) for line in lines[:11]] == [
        bool(i % 2) for i in range(11)]
    assert [item["index"] for item in lines[-1]["response"]["body"]["data"]] == [0, 1]
    direct = get_runner(MODEL, "int8").embed([d["text"] for d in docs])
    assert min(cosine(v, direct[i]) for i, v in enumerate(vectors)) >= 0.99
    assert all(len(v) == 384 for v in vectors)
    # The classification batch completed too, each line its document's label, with a score per label.
    assert classified.status == "completed" and classified.request_counts.completed == len(labelled), classified
    lines = [json.loads(line) for line in client.files.content(classified.output_file_id).text.splitlines()]
    assert [(line["custom_id"], line["response"]["body"]["data"][0]["label"]) for line in lines] == [
        (custom_id, label) for custom_id, _, label in labelled]
    assert all(set(line["response"]["body"]["data"][0]["scores"]) == {label["name"] for label in CLASSIFIER_LABELS}
               for line in lines)
    # So did the OCR batch: each page's text read from its image, with its lines and their boxes.
    assert read.status == "completed" and read.request_counts.completed == 2, read
    assert Job.objects.get(batch__public_id=read.id).max_price_micros == AIModel.objects.get(
        slug="rapidocr-pp-ocrv4").price_from_buyer(1_000_000)
    lines = [json.loads(line) for line in client.files.content(read.output_file_id).text.splitlines()]
    texts = [page["text"] for line in lines for page in line["response"]["body"]["data"]]
    assert [line["custom_id"] for line in lines] == ["scan-1", "scan-2"] and len(texts) == 3
    assert max(error_rate(text, truth) for text, truth in zip(texts, corpus.page_texts(3))) < 0.08
    assert lines[1]["response"]["body"]["usage"] == {"pages": 2}
    assert all(page["lines"][0]["box"] for line in lines for page in line["response"]["body"]["data"])


# --- in process: the market behind a batch ---------------------------------------------------------------

def batch_file_for(buyer, rows: list):
    content = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    return services.batch_file_create(organisation=buyer.organisation, user=buyer, upload=io.BytesIO(content),
                                      filename="requests.jsonl", purpose="batch")


@pytest.mark.django_db
def test_an_expired_batch_delivers_its_finished_requests_and_lists_the_rest_as_expired(buyer, settings):
    # Given a batch of ten requests cut into two units (8 + 2 documents), the first of them computed,
    settings.DOCS_PER_UNIT = 8
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = True
    buyer_webhooks.endpoint_create(organisation=buyer.organisation, url="http://127.0.0.1:9/hook",
                                   events=["batch.expired", "batch.completed"])
    rows = [request_line(f"r{i}", f"document number {i}") for i in range(10)]
    file = batch_file_for(buyer, rows)
    batch = flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                               endpoint="/v1/embeddings", completion_window="24h")
    job = batch.job
    vector = base64.b64encode(np.arange(384, dtype="<f4").tobytes()).decode()
    WorkUnit.objects.filter(job=job, seq=0).update(state=WorkUnit.State.DONE, result=[vector] * 8)
    assert selectors.batch_public(batch)["request_counts"] == {"total": 10, "completed": 8, "failed": 0}
    # when its deadline passes (the auction tick closes the job) and it is finalized,
    flows.job_close(job_id=job.pk, state=Job.State.EXPIRED, reason="job_expired")
    assert selectors.batch_status(Batch.objects.get(pk=batch.pk)) == "finalizing"
    assert flows.batches_finalize() == 1 and flows.batches_finalize() == 0  # once
    batch = Batch.objects.get(pk=batch.pk)
    public = selectors.batch_public(batch)
    # then it is expired, with the eight finished requests in its output file and the two others in its error file,
    assert public["status"] == "expired" and public["expired_at"] and public["completed_at"] is None
    assert public["request_counts"] == {"total": 10, "completed": 8, "failed": 2}
    output = [json.loads(line) for line in BatchFile.objects.get(public_id=batch.output_file_id).content.splitlines()]
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(8)]
    assert output[0]["response"]["body"]["data"][0]["embedding"] == list(range(384))
    errors = [json.loads(line) for line in BatchFile.objects.get(public_id=batch.error_file_id).content.splitlines()]
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errors] == [
        ("r8", "batch_expired", 9), ("r9", "batch_expired", 10)]
    assert public["usage"]["input_tokens"] == sum(
        line["response"]["body"]["usage"]["prompt_tokens"] for line in output) > 0
    # and the buyer's endpoint gets one batch.expired event, with the batch as the API shows it.
    events = list(BuyerWebhookEvent.objects.filter(organisation=buyer.organisation))
    assert [e.type for e in events] == ["batch.expired"]
    data = json.loads(events[0].body)["data"]
    assert data["id"] == batch.public_id and data["batch"] == public and data["job"]["state"] == "expired"
    # and an expired batch cannot be cancelled.
    with pytest.raises(Conflict):
        flows.batch_cancel(batch=batch)


@pytest.mark.django_db
def test_without_a_bid_a_batch_bids_the_suggested_price_lowered_to_what_the_balance_reserves():
    # Given a market that cleared at 800,000 µ, and a buyer with enough credit for everything,
    AuctionRound.objects.create(market="int8", cleared_at=timezone.now(), interval_s=2, clearing_price_micros=800_000)
    rich = BuyerFactory()
    file = batch_file_for(rich, [request_line("a", "some text " * 40)])
    batch = flows.batch_create(organisation=rich.organisation, user=rich, input_file_id=file.public_id,
                               endpoint="/v1/embeddings", completion_window="24h")
    # then its bid is the new-job page's suggestion (the last price plus 25 %);
    assert batch.job.max_price_micros == selectors.suggested_bid_micros(precision="int8") == 1_000_000
    # and a buyer with one cent bids what one cent reserves for the whole batch, and the reservation holds.
    poor = BuyerFactory(organisation__credit=1)
    file = batch_file_for(poor, [request_line("a", "some text " * 40)])
    batch = flows.batch_create(organisation=poor.organisation, user=poor, input_file_id=file.public_id,
                               endpoint="/v1/embeddings", completion_window="24h")
    job = batch.job
    assert job.max_price_micros == min(1_000_000, femto_per_minor("usd") // job.mops_total)
    assert Reservation.objects.get(job=job).amount_minor <= 1


@pytest.mark.django_db
def test_over_the_rate_a_key_gets_429_in_openai_shape_with_retry_after(api_key, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"api_key": "2/min"}}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    assert [client.get("/v1/files").status_code for _ in range(2)] == [200, 200]
    response = client.get("/v1/files")
    assert response.status_code == 429 and 0 < int(response["Retry-After"]) <= 60
    assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "rate_limit_error",
                                        "param": None, "code": "rate_limit_exceeded"}


@pytest.mark.django_db
def test_the_job_page_of_a_batch_shows_its_custom_ids_and_that_it_bids_the_default(buyer, client):
    rows = [request_line(f"my-id-{i}", f"text {i}") for i in range(25)] + [request_line("bad", "x", model="gpt-4")]
    file = batch_file_for(buyer, rows)
    batch = flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                               endpoint="/v1/embeddings", completion_window="24h")
    client.force_login(buyer)
    page = client.get(f"/buyer/jobs/{batch.job_id}/").content.decode()
    assert batch.public_id in page and file.public_id in page and "1 refused at validation" in page
    assert "<code>my-id-0</code>" in page and "<code>my-id-19</code>" in page and "and 5 more" in page
    assert "my-id-20<" not in page and "The suggested price, capped by the balance" in page


@pytest.mark.django_db
def test_a_keys_default_bid_set_through_our_api_or_the_keys_page_is_the_bid_of_its_batches(buyer, api_key, client):
    # Given a key whose default batch bid is set through our API to $0.30 per million tokens,
    key = buyer.organisation.api_keys.get()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    response = api.patch(f"/api/v1/keys/{key.pk}/", {"default_bid_per_million_tokens_micros": 300_000}, format="json")
    assert response.status_code == 200 and response.json()["default_bid_per_million_tokens_micros"] == 300_000
    assert [k["prefix"] for k in api.get("/api/v1/keys/").json()["results"]] == [key.prefix]
    # (another organisation's key is a 404, and a bid of 0 is refused)
    stranger = BuyerFactory()
    _, other = services.api_key_create(organisation=stranger.organisation, name="x", created_by=stranger)
    assert api.get(f"/api/v1/keys/{stranger.organisation.api_keys.get().pk}/").status_code == 404
    assert api.patch(f"/api/v1/keys/{key.pk}/", {"default_bid_per_million_tokens_micros": 0},
                     format="json").status_code == 400
    # when a batch that names no bid is created with it,
    content = json.dumps(request_line("a", "text")).encode() + b"\n"
    file_id = api.post("/v1/files", {"file": io.BytesIO(content), "purpose": "batch"}, format="multipart").json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    made = api.post("/v1/batches", body, format="json").json()
    # then its job bids the key's default, converted to the model's compute unit;
    job = Job.objects.get(pk=made["job_id"])
    assert made["bid_source"] == "api_key" and job.max_price_micros == price_micros_for_per_units(per_units_micros=300_000, ops_per_unit=job.ai_model.ops_per_token, per=10**6)
    # a bid in the request wins over it;
    made = api.post("/v1/batches", {**body, "max_price_per_million_tokens": "0.4"}, format="json").json()
    assert made["bid_source"] == "request" and Job.objects.get(pk=made["job_id"]).max_price_micros == (
        price_micros_for_per_units(per_units_micros=400_000, ops_per_unit=job.ai_model.ops_per_token, per=10**6))
    # and on the keys page the buyer changes it, or clears it back to the suggested price.
    client.force_login(buyer)
    assert 'value="0.3"' in client.get("/buyer/").content.decode()
    client.post(f"/buyer/keys/{key.pk}/default-bid/", {"default_bid": "0.05"})
    key.refresh_from_db()
    assert key.default_bid_per_million_tokens_micros == 50_000
    client.post(f"/buyer/keys/{key.pk}/default-bid/", {"default_bid": ""})
    key.refresh_from_db()
    assert key.default_bid_per_million_tokens_micros is None
    made = api.post("/v1/batches", {**body, "metadata": {"again": "yes"}}, format="json").json()
    assert made["bid_source"] == "default"


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks contend only on PostgreSQL (the services run)")
def test_the_same_batch_created_twice_at_once_makes_one_batch_and_one_job():
    # Given a buyer's file, when the same create request arrives twice at the same moment (a client retrying),
    buyer = BuyerFactory()
    file = batch_file_for(buyer, [request_line(f"r{i}", f"text {i}") for i in range(40)])
    barrier, made, errors = threading.Barrier(2), [], []

    def create():
        try:
            barrier.wait()
            made.append(flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                                           endpoint="/v1/embeddings", completion_window="24h").public_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # then both get the one batch, run as one job.
    assert not errors and len(made) == 2 and made[0] == made[1]
    assert Batch.objects.count() == 1 and Job.objects.filter(organisation=buyer.organisation).count() == 1


@pytest.mark.django_db
def test_a_batch_refused_whole_sends_batch_failed_without_a_job(buyer, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_URLS = True
    buyer_webhooks.endpoint_create(organisation=buyer.organisation, url="http://127.0.0.1:9/hook", events=[])
    file = batch_file_for(buyer, [request_line("a", "text", model="text-embedding-3-small")])
    batch = flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                               endpoint="/v1/embeddings", completion_window="24h")
    event = BuyerWebhookEvent.objects.get(organisation=buyer.organisation)
    data = json.loads(event.body)["data"]
    assert event.type == "batch.failed" and event.job is None and data["id"] == batch.public_id
    assert "job" not in data and data["batch"]["status"] == "failed"


@pytest.mark.django_db
def test_a_file_past_its_retention_is_gone_at_once_and_deleted_by_the_sweep(buyer, api):
    # Given two files, one of them past its expiry,
    kept = batch_file_for(buyer, [request_line("a", "text")])
    gone = batch_file_for(buyer, [request_line("a", "text")])
    BatchFile.objects.filter(pk=gone.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    # then the expired one is no longer shown, even before the sweep,
    assert api.get(f"/v1/files/{gone.public_id}").status_code == 404
    assert [f["id"] for f in api.get("/v1/files").json()["data"]] == [kept.public_id]
    # and the sweep deletes it, content and all, and only it.
    assert services.batch_files_expire() == 1
    assert list(BatchFile.objects.values_list("public_id", flat=True)) == [kept.public_id]


@pytest.mark.django_db
def test_a_cancelled_batchs_buyer_pays_only_for_the_requests_in_its_output_file(buyer, settings):
    # Given a batch whose third request is a list of four inputs cut across two units (8 + 4 documents),
    settings.DOCS_PER_UNIT = 8
    rows = ([request_line(f"r{i}", f"a single document, number {i}, about tides") for i in range(6)]
            + [request_line("list", [f"one of four parts, part {k}, about ferries" for k in range(4)])]
            + [request_line(f"s{i}", f"a later document, number {i}") for i in range(2)])
    balance = lambda: account_balance_minor(account=account_get(  # noqa: E731
        kind="buyer", currency=django_settings.CURRENCY, organisation=buyer.organisation))
    before = balance()
    batch = flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=batch_file_for(buyer, rows)
                               .public_id, endpoint="/v1/embeddings", completion_window="24h",
                               max_price_per_unit_micros=20_000 * 10**6)
    job = batch.job
    # and the first unit computed (six whole requests and two of the list's four parts) and charged,
    reserve = price_micros_for_per_units(per_units_micros=10_000 * 10**6, ops_per_unit=job.ai_model.ops_per_token, per=10**6)
    car = VehicleFactory(policy__reserve_price_micros=reserve)
    deliver(car, mops_per_s=50_000)
    complete_units(job, 1)
    meter = MeterRecord.objects.get(job=job, role=MeterRecord.Role.BUYER)
    assert meter.charge_femto > 0
    # when the buyer cancels it (which finalizes it; again does nothing),
    flows.batch_cancel(batch=batch)
    assert not flows.batch_finalize(batch_id=batch.pk) and flows.batches_finalize() == 0
    batch = Batch.objects.get(pk=batch.pk)
    output = [json.loads(line) for line in BatchFile.objects.get(public_id=batch.output_file_id).content.splitlines()]
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(6)]
    errors = [json.loads(line) for line in BatchFile.objects.get(public_id=batch.error_file_id).content.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("list", "batch_cancelled"), ("s0", "batch_cancelled"), ("s1", "batch_cancelled")]
    # then the buyer paid for the six delivered requests only: the unit's charge by their share of its tokens,
    # rounded up once (a cent either way for the per-document shares' rounding),
    delivered = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    owed = femto_to_minor_ceil(femto=meter.charge_femto * delivered // meter.tokens, currency=job.currency)
    assert 0 < delivered < meter.tokens and owed < femto_to_minor_ceil(femto=meter.charge_femto, currency=job.currency)
    assert abs((before - balance()) - owed) <= 1
    # the credit comes from the platform's fee (the car keeps its pay for work it did), once, and balanced.
    credit = LedgerTransaction.objects.get(job=job, kind=LedgerTransaction.Kind.UNDELIVERED)
    assert {e.account.kind: e.amount_minor for e in credit.entries.select_related("account")} == {
        "buyer": credit.entries.get(account__kind="buyer").amount_minor,
        "platform_fee": -credit.entries.get(account__kind="buyer").amount_minor}
    assert not unbalanced_transaction_ids()
