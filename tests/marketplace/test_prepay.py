"""Buyers pay in advance, as the API and the pages show it: a job the balance cannot fund is refused with a
clear error (402 insufficient_balance on the API, a message on the page) and nothing is created; the estimate
says what the job will reserve; cancelling returns the rest at once."""

from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from billing.models import Reservation
from billing.selectors import buyer_balance_minor
from marketplace import corpus
from marketplace.models import Job
from tests.conftest import jsonl
from tests.factories import BuyerFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def buyer():
    return BuyerFactory(organisation__credit=500)  # $5.00


def job_body(**overrides) -> dict:
    return {"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": 2_000_000,
            "deadline": (timezone.now() + timedelta(hours=2)).isoformat(), "inputs": corpus.documents(20),
            **overrides}


def test_the_api_refuses_a_job_the_balance_cannot_fund_with_402_and_creates_nothing(api, buyer):
    response = api.post("/api/v1/jobs/", job_body(budget_cap_minor=501), format="json")
    assert response.status_code == 402, response.content
    error = response.json()["error"]
    assert error["code"] == "insufficient_balance" and "$5.00" in error["message"]
    assert (error["balance_minor"], error["needed_minor"]) == (500, 501)
    assert not Job.objects.exists() and buyer_balance_minor(organisation=buyer.organisation) == 500


def test_the_api_reserves_the_cap_and_cancelling_returns_the_rest_at_once(api, buyer):
    response = api.post("/api/v1/jobs/", job_body(budget_cap_minor=300), format="json")
    assert response.status_code == 201, response.content
    job_id = response.json()["id"]
    org = buyer.organisation
    assert buyer_balance_minor(organisation=org) == 200
    assert buyer_balance_minor(organisation=org, kind="buyer_reserved") == 300
    # raising the cap past the balance is refused and changes nothing
    refused = api.post(f"/api/v1/jobs/{job_id}/budget/", {"budget_cap_minor": 900}, format="json")
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "insufficient_balance"
    assert Job.objects.get(pk=job_id).budget_cap_minor == 300
    assert api.post(f"/api/v1/jobs/{job_id}/cancel/").status_code == 200
    assert buyer_balance_minor(organisation=org) == 500
    assert buyer_balance_minor(organisation=org, kind="buyer_reserved") == 0
    assert Reservation.objects.get(job_id=job_id).status == Reservation.Status.RELEASED


def test_the_new_job_page_shows_the_balance_and_says_when_it_cannot_fund_the_job(client, buyer):
    client.force_login(buyer)
    page = client.get(reverse("job-new")).content.decode()
    assert 'data-testid="balance"' in page and "$5.00" in page
    response = client.post(reverse("job-new"), {
        "model": "all-minilm-l6-v2", "precision": "int8", "max_price_per_unit": "0.05", "budget_cap": "6",
        "deadline": (timezone.now() + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
        "inputs": SimpleUploadedFile("docs.jsonl", jsonl(corpus.documents(20)), content_type="application/jsonl")})
    assert response.status_code == 200 and not Job.objects.exists()
    assert "does not cover" in response.content.decode() and "Top up" in response.content.decode()


def test_the_estimate_says_what_the_job_reserves_and_warns_when_the_balance_is_short(client, buyer):
    client.force_login(buyer)
    query = {"model": "all-minilm-l6-v2", "precision": "int8", "docs": 100, "chars": 40_000,
             "max_price_per_unit": "1"}
    enough = client.get(reverse("job-estimate"), {**query, "budget_cap": "4"}).content.decode()
    assert 'data-testid="estimate-reserve"' in enough and "$4.00" in enough and "balance-warning" not in enough
    short = client.get(reverse("job-estimate"), {**query, "budget_cap": "7"}).content.decode()
    assert 'data-testid="balance-warning"' in short and "$5.00" in short
