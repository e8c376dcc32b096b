"""Classification, the second workload module (fleet.workloads.classification on the server,
fleet.agent.workloads.classification on the car; docs/workloads.md): the buyer's labels checked, each document
labelled by the real MiniLM encoder (zero-shot or through the buyer's linear head), results checked and verified
like any workload's, through our job API and the OpenAI-compatible batch surface."""

import base64
import io
import json
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from fleet import verification, workloads
from fleet.agent.client import cheat_embed
from fleet.agent.models import get_runner
from fleet.agent.workloads import compute
from fleet.models import Vehicle
from marketplace import flows, selectors, services
from marketplace.models import AIModel, Batch, BatchFile, Job
from tests.factories import VehicleFactory
from tests.fleet.test_verification import market, work  # noqa: F401 (the fixture)

CLASSIFIER = "minilm-l6-classifier"
LABELS = [{"name": "sport", "description": "football, tennis, matches, athletes and scores"},
          {"name": "cooking", "description": "recipes, ingredients, baking and kitchens"},
          {"name": "finance", "description": "banks, interest rates, loans, invoices and markets",
           "examples": ["The invoice is due within thirty days."]}]
DOCUMENTS = [("The striker scored twice before half time and the crowd cheered.", "sport"),
             ("Whisk the eggs with sugar, then fold in the flour and bake for twenty minutes.", "cooking"),
             ("The central bank raised interest rates by a quarter point to curb inflation.", "finance"),
             ("She won the tennis final in three sets.", "sport"),
             ("Simmer the onions in butter until soft, then add the stock.", "cooking"),
             ("Please pay the attached invoice for March by bank transfer.", "finance")]
WORKLOAD = workloads.get("classification")


def model_info() -> workloads.ModelInfo:
    entry = WORKLOAD.catalogue[0]
    return workloads.ModelInfo(slug=entry.slug, task="classification", runtime=entry.runtime, dims=entry.dims,
                               max_tokens=entry.max_tokens)


def run(texts, params, precision="int8"):
    return compute("classification", texts, params, get_runner(model_info().runtime, precision).embed)


# --- the module --------------------------------------------------------------------------------------

@pytest.mark.pure
@pytest.mark.parametrize("params, param", [
    (None, "labels"),
    ({"labels": ["only one"]}, "labels"),
    ({"labels": ["a", "a"]}, "labels"),
    ({"labels": ["a", {"name": ""}]}, "labels[1].name"),
    ({"labels": ["a", {"name": "b", "examples": "not a list"}]}, "labels[1].examples"),
    ({"labels": ["a", {"name": "b", "colour": "red"}]}, "labels[1]"),
    ({"labels": ["a", "b"], "head": {"weights_b64": "AAAA", "bias": [0, 0]}}, "head.weights_b64"),
    ({"labels": ["a", "b"], "temperature": 2}, "params"),
])
def test_bad_labels_are_refused_naming_the_field(params, param):
    with pytest.raises(workloads.BadInput) as refused:
        WORKLOAD.params_clean(params, model_info())
    assert refused.value.param == param and refused.value.message


@pytest.mark.pure
def test_zero_shot_labels_each_document_by_its_meaning_with_the_real_encoder():
    params = WORKLOAD.params_clean({"labels": LABELS}, model_info())
    result = run([text for text, _ in DOCUMENTS], params)
    assert [item["label"] for item in result] == [label for _, label in DOCUMENTS]
    assert WORKLOAD.result_problem(model_info(), params, len(DOCUMENTS), result) is None
    # Each score is the cosine with the label's vector; the label is the highest score's.
    for item in result:
        assert len(item["scores"]) == 3 and max(item["scores"]) == item["scores"][
            [label["name"] for label in LABELS].index(item["label"])]
    # Two honest runs agree, and an fp32 run agrees with an int8 one within the int8 tolerance.
    assert WORKLOAD.results_agree(result, run([text for text, _ in DOCUMENTS], params), precision="int8",
                                  params=params)
    assert WORKLOAD.results_agree(result, run([text for text, _ in DOCUMENTS], params, "fp32"), precision="int8",
                                  params=params)


@pytest.mark.pure
def test_a_linear_head_scores_are_probabilities_from_the_buyers_weights():
    # Given a head whose rows are the labels' own directions, scaled (what a trained head resembles),
    runner = get_runner(model_info().runtime, "int8")
    directions = runner.embed([f"{label['name']}: {label['description']}" for label in LABELS])
    weights = (directions * 20).astype("<f4")
    params = WORKLOAD.params_clean({"labels": [label["name"] for label in LABELS],
                                    "head": {"weights_b64": base64.b64encode(weights.tobytes()).decode(),
                                             "bias": [0.0, 0.0, 0.0]}}, model_info())
    result = run([text for text, _ in DOCUMENTS], params)
    # then each document's scores sum to 1, and the labels are right,
    assert all(abs(sum(item["scores"]) - 1) < 1e-4 for item in result)
    assert [item["label"] for item in result] == [label for _, label in DOCUMENTS]
    # and a head costs no label tokens (zero-shot pays for embedding the labels on each unit).
    assert WORKLOAD.unit_overhead(model_info(), params) == 0
    assert WORKLOAD.unit_overhead(model_info(), WORKLOAD.params_clean({"labels": LABELS}, model_info())) > 0


@pytest.mark.pure
@pytest.mark.parametrize("kind", ["random_vectors", "one_vector", "rotate_rows", "first_words"])
def test_a_cheating_encoder_gives_a_result_of_the_right_shape_that_verification_refuses(kind):
    """The cheats of the simulator replace the encoder: the result is well-formed (the car is paid unless
    checked) and wrong, and the comparison says so. (``negate`` is left out: negating every vector, the labels'
    too, leaves every cosine as it is, so that result is right, and cost the car the whole computation.)"""
    params = WORKLOAD.params_clean({"labels": LABELS}, model_info())
    texts = [text for text, _ in DOCUMENTS]
    runner = get_runner(model_info().runtime, "int8")
    rng = np.random.default_rng(3)

    def embed(batch):
        return cheat_embed(kind, batch, embed=runner.embed, dims=384, rng=rng)[0]

    cheated = compute("classification", texts, params, embed)
    assert WORKLOAD.result_problem(model_info(), params, len(texts), cheated) is None
    assert not WORKLOAD.results_agree(cheated, run(texts, params), precision="int8", params=params)


@pytest.mark.pure
def test_a_result_whose_label_is_not_its_highest_score_or_out_of_shape_is_refused():
    params = WORKLOAD.params_clean({"labels": LABELS}, model_info())
    good = run([DOCUMENTS[0][0]], params)
    assert WORKLOAD.result_problem(model_info(), params, 1, good) is None
    lying = [{"label": "finance", "scores": good[0]["scores"]}]
    assert "highest" in WORKLOAD.result_problem(model_info(), params, 1, lying)
    assert WORKLOAD.result_problem(model_info(), params, 1, [{"label": "sport", "scores": [0.5]}])
    assert WORKLOAD.result_problem(model_info(), params, 2, good)
    assert WORKLOAD.result_problem(model_info(), params, 1, [{"label": "sport", "scores": [float("nan")] * 3}])


# --- the market ----------------------------------------------------------------------------------------

def classification_job(buyer, docs=DOCUMENTS, labels=LABELS) -> Job:
    rows = b"".join(json.dumps({"id": f"d{i}", "text": text}).encode() + b"\n" for i, (text, _) in enumerate(docs))
    return flows.job_create(organisation=buyer.organisation, user=buyer, model_slug=CLASSIFIER, precision="int8",
                            max_price_micros=2_000_000, deadline=timezone.now() + timedelta(hours=1),
                            inputs=io.BytesIO(rows), params={"labels": labels})


def honest_classifier(texts, unit):
    return compute("classification", texts, unit.job.params, get_runner(model_info().runtime, "int8").embed)


@pytest.mark.django_db
def test_the_catalogue_lists_the_classifier_as_data_with_its_licence_and_size():
    row = AIModel.objects.get(slug=CLASSIFIER)
    assert (row.task, row.licence, row.runtime) == ("classification", "Apache-2.0", "all-minilm-l6-v2")
    assert row.size_bytes > 0 and row.precisions == ["int8", "fp32"]


@pytest.mark.django_db
def test_a_classification_job_is_costed_with_its_labels_computed_by_cars_and_its_results_name_the_labels(
        buyer, market):
    job = classification_job(buyer)
    # Each unit pays for its documents' tokens and for embedding the labels once.
    overhead = WORKLOAD.unit_overhead(model_info(), job.params)
    doc_tokens = sum(WORKLOAD.costs(model_info(), [{"text": t} for t, _ in DOCUMENTS]))
    assert job.tokens_total == doc_tokens + overhead * job.units_total and overhead > 0
    # Two honest cars of two owners compute it (with verification as deployed: replicas, canaries),
    cars = [VehicleFactory(policy__reserve_price_micros=0) for _ in range(2)]
    work({car.pk: honest_classifier for car in cars})
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    rows = [json.loads(line) for line in selectors.job_results_lines(job=job)]
    assert [(row["id"], row["label"]) for row in rows] == [(f"d{i}", label) for i, (_, label) in enumerate(DOCUMENTS)]
    assert set(rows[0]["scores"]) == {"sport", "cooking", "finance"}


@pytest.mark.django_db
def test_a_car_that_sends_wrong_labels_is_caught_and_no_wrong_label_is_delivered(buyer, market):
    honest_car, cheater = VehicleFactory(policy__reserve_price_micros=0), VehicleFactory(policy__reserve_price_micros=0)
    job = classification_job(buyer, docs=DOCUMENTS * 4)
    runner = get_runner(model_info().runtime, "int8")
    rng = np.random.default_rng(5)

    def cheat(texts, unit):
        return compute("classification", texts, unit.job.params,
                       lambda batch: cheat_embed("random_vectors", batch, embed=runner.embed, dims=384, rng=rng)[0])

    work({honest_car.pk: honest_classifier, cheater.pk: cheat})
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    labels = [json.loads(line)["label"] for line in selectors.job_results_lines(job=job)]
    assert labels == [label for _, label in DOCUMENTS * 4]
    assert Vehicle.objects.get(pk=cheater.pk).wrong_results >= 1
    assert Vehicle.objects.get(pk=honest_car.pk).wrong_results == 0


@pytest.mark.django_db
def test_the_job_api_takes_labels_as_params_and_refuses_bad_ones_by_field(api):
    body = {"model": CLASSIFIER, "precision": "int8", "max_price_micros": 2_000_000,
            "deadline": (timezone.now() + timedelta(hours=1)).isoformat(),
            "inputs": [{"text": text} for text, _ in DOCUMENTS[:2]]}
    created = api.post("/api/v1/jobs/", {**body, "params": {"labels": LABELS}}, format="json")
    assert created.status_code == 201, created.json()
    assert created.json()["task"] == "classification" and created.json()["params"]["labels"][0]["name"] == "sport"
    refused = api.post("/api/v1/jobs/", {**body, "params": {"labels": ["one"]}}, format="json")
    assert refused.status_code == 400
    assert "labels" in refused.json()["error"]["fields"]["params"][0]
    assert Job.objects.count() == 1


# --- the OpenAI-compatible batch surface ----------------------------------------------------------------

def request_line(custom_id, text, labels=LABELS):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/classifications",
            "body": {"model": CLASSIFIER, "input": text, "labels": labels}}


@pytest.mark.django_db
def test_a_classification_batch_runs_as_a_job_and_its_output_lines_carry_label_and_scores(buyer, market):
    rows = [request_line(f"r{i}", text) for i, (text, _) in enumerate(DOCUMENTS)]
    rows.append(request_line("other-labels", "a text", labels=["x", "y"]))
    content = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    file = services.batch_file_create(organisation=buyer.organisation, user=buyer, upload=io.BytesIO(content),
                                      filename="requests.jsonl", purpose="batch")
    batch = flows.batch_create(organisation=buyer.organisation, user=buyer, input_file_id=file.public_id,
                               endpoint="/v1/classifications", completion_window="24h")
    assert batch.job.params["labels"][2]["examples"] and batch.job.ai_model.task == "classification"
    assert [(e["line"], e["code"]) for e in batch.line_errors] == [(7, "mismatched_params")]
    work({VehicleFactory(policy__reserve_price_micros=0).pk: honest_classifier,
          VehicleFactory(policy__reserve_price_micros=0).pk: honest_classifier})
    assert flows.batches_finalize() == 1
    batch = Batch.objects.get(pk=batch.pk)
    output = [json.loads(line) for line in BatchFile.objects.get(public_id=batch.output_file_id).content.splitlines()]
    assert [(line["custom_id"], line["response"]["body"]["data"][0]["label"]) for line in output] == [
        (f"r{i}", label) for i, (_, label) in enumerate(DOCUMENTS)]
    body = output[0]["response"]["body"]
    assert body["object"] == "list" and body["data"][0]["object"] == "classification"
    assert set(body["data"][0]["scores"]) == {"sport", "cooking", "finance"} and body["usage"]["prompt_tokens"] > 0


@pytest.mark.pure
def test_verification_compares_by_the_jobs_workload():
    params = WORKLOAD.params_clean({"labels": LABELS}, model_info())
    result = run([DOCUMENTS[0][0]], params)
    shifted = [{"label": result[0]["label"], "scores": [s + 0.06 for s in result[0]["scores"]]}]
    assert verification.results_agree(result, result, precision="int8", task="classification", params=params)
    assert not verification.results_agree(result, shifted, precision="int8", task="classification", params=params)


# --- the pages ---------------------------------------------------------------------------------------------

def form_post(client, model, labels, docs=DOCUMENTS[:2]):
    upload = io.BytesIO(b"".join(json.dumps({"text": text}).encode() + b"\n" for text, _ in docs))
    upload.name = "docs.jsonl"
    return client.post("/buyer/jobs/new/", {
        "model": model, "precision": "int8", "max_price_per_unit": "5", "labels": labels,
        "deadline": (timezone.now() + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"), "inputs": upload})


@pytest.mark.django_db
def test_the_new_job_page_takes_labels_one_a_line_and_says_what_is_wrong_with_them(client, buyer):
    client.force_login(buyer)
    refused = form_post(client, CLASSIFIER, "only one label")
    assert refused.status_code == 200 and "2 to 32 labels" in refused.content.decode()
    refused = form_post(client, "all-minilm-l6-v2", "sport\ncooking")
    assert "takes no labels" in refused.content.decode()
    assert not Job.objects.exists()
    created = form_post(client, CLASSIFIER, "sport: football and tennis\ncooking\nfinance: banks")
    job = Job.objects.get()
    assert created.status_code == 302 and job.params == {"labels": [
        {"name": "sport", "description": "football and tennis"}, {"name": "cooking"},
        {"name": "finance", "description": "banks"}]}


@pytest.mark.django_db
def test_the_job_page_of_a_classification_counts_the_labels_so_far(client, buyer, market):
    job = classification_job(buyer)
    client.force_login(buyer)
    page = client.get(f"/buyer/jobs/{job.pk}/").content.decode()
    assert 'data-testid="results-summary"' in page and 'data-testid="labels"' in page
    work({VehicleFactory(policy__reserve_price_micros=0).pk: honest_classifier,
          VehicleFactory(policy__reserve_price_micros=0).pk: honest_classifier})
    summary = selectors.job_results_summary(job=job)
    assert summary == [("sport", 2), ("cooking", 2), ("finance", 2)]
    page = client.get(f"/buyer/jobs/{job.pk}/").content.decode()
    assert "<td>finance</td><td class=\"num\">2</td>" in page
    # an embeddings job has no summary
    assert selectors.job_results_summary(job=Job(ai_model=AIModel.objects.get(slug="all-minilm-l6-v2"))) is None


@pytest.mark.django_db
def test_an_agent_that_does_not_run_classification_is_sold_none_and_leased_none(buyer, market):
    """An older agent (its hello lists only embedding, or no tasks at all) is neither allocated a classification
    job's capacity in the auction nor given its units: they wait for a car that runs them."""
    from marketplace.models import Allocation

    old = VehicleFactory(policy__reserve_price_micros=0, tasks=["embedding"])
    job = classification_job(buyer)
    flows.auction_tick()
    assert not Allocation.objects.filter(job=job, vehicle=old).exists()
    units, _ = flows.units_lease(vehicle_id=old.pk)
    assert units == []
    new = VehicleFactory(policy__reserve_price_micros=0)
    work({new.pk: honest_classifier, old.pk: honest_classifier})
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    assert not job.units.filter(completed_by=old).exists()


@pytest.mark.django_db
def test_the_market_page_lists_every_workloads_model_with_its_price_in_its_unit(client):
    from django.urls import reverse

    from marketplace.models import AuctionRound

    AuctionRound.objects.create(market="int8", cleared_at=timezone.now(), interval_s=2, clearing_price_micros=800_000)
    page = client.get(reverse("market")).content.decode()
    catalogue = page[page.index('data-testid="catalogue"'):page.index('id="prices-title"')]
    assert "Embeddings" in catalogue and "Classification" in catalogue and "Apache-2.0" in catalogue
    assert "Document OCR" in catalogue and catalogue.count("per thousand pages") == 1
    # fp32 has no trade yet: two token models and the page model show none there.
    assert catalogue.count("per million tokens") == 2 and catalogue.count("no trade yet") == 3
