"""The buyer's pages through Django's test client: a new job priced per million tokens, the estimate from
the market's depth, the job's progress figures, the team, and the public market page (aggregates only)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from billing.money import mops_for_tokens, price_micros_for_per_units, price_per_units_micros
from fleet.models import WorkUnit
from marketplace import corpus, market
from marketplace.models import AIModel, AuctionRound, Job, User
from tests.conftest import jsonl
from tests.factories import BuyerFactory, PolicyFactory, VehicleFactory, future

pytestmark = pytest.mark.django_db

MODEL = "all-minilm-l6-v2"


@pytest.fixture(autouse=True)
def fresh_depth():
    cache.clear()  # market depth is cached for a few seconds
    yield
    cache.clear()


@pytest.fixture
def signed_in(client, buyer):
    client.force_login(buyer)
    return client


def new_job(client, *, rows=None, body=None, per_unit="0.05", precision="int8"):
    return client.post(reverse("job-new"), {
        "model": MODEL, "precision": precision, "max_price_per_unit": per_unit,
        "deadline": (timezone.now() + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
        "inputs": SimpleUploadedFile("docs.jsonl", jsonl(rows) if body is None else body, content_type="application/jsonl")})


def test_a_bid_typed_per_million_tokens_is_stored_per_compute_unit_never_above_it(signed_in, buyer):
    response = new_job(signed_in, rows=corpus.documents(10), per_unit="0.05")
    job = Job.objects.get(organisation=buyer.organisation)
    assert response.status_code == 302 and response.url == reverse("job-detail", args=[job.pk])
    ai_model = AIModel.objects.get(slug=MODEL)
    assert job.max_price_micros == price_micros_for_per_units(per_units_micros=50_000, ops_per_unit=ai_model.ops_per_token, per=10**6)
    # the stored bid, read back per million tokens, is at most what the buyer typed and within a micro-dollar of it
    back = price_per_units_micros(price_micros=job.max_price_micros, ops_per_unit=ai_model.ops_per_token, per=10**6)
    assert 50_000 - 1 <= back <= 50_000


def test_bad_lines_are_named_on_the_page_and_nothing_is_created(signed_in, buyer):
    response = new_job(signed_in, body=b'{"text": "fine"}\nnot json\n{"text": ""}\n')
    page = response.content.decode()
    assert response.status_code == 200
    assert "Line 2: not valid JSON" in page and "Line 3: " in page
    assert not Job.objects.filter(organisation=buyer.organisation).exists()


def test_a_precision_the_model_does_not_run_is_refused_with_a_message(signed_in, buyer):
    ai_model = AIModel.objects.get(slug=MODEL)
    ai_model.precisions = ["int8"]
    ai_model.save(update_fields=["precisions"])
    response = new_job(signed_in, rows=corpus.documents(3), precision="fp32")
    assert response.status_code == 200 and "runs at INT8" in response.content.decode()
    assert not Job.objects.filter(organisation=buyer.organisation).exists()


def test_the_estimate_prices_the_work_at_the_last_clearing_price_and_times_it_by_the_depth_at_the_bid(signed_in):
    # Given two cars offering INT8 (reserves 100,000 and 900,000 µ$/PetaOp), a last clearing price of 400,000,
    cheap, dear = VehicleFactory(), VehicleFactory()
    PolicyFactory._meta.model.objects.filter(vehicle=dear).update(reserve_price_micros=900_000)
    AuctionRound.objects.create(market="int8", cleared_at=timezone.now(), interval_s=2, clearing_price_micros=400_000)
    ai_model = AIModel.objects.get(slug=MODEL)
    bid_micros = 500_000
    per_unit = Decimal(price_per_units_micros(price_micros=bid_micros, ops_per_unit=ai_model.ops_per_token, per=10**6) + 1) / 10**6
    # when the page asks for an estimate of 1,000 documents of 4,000 characters,
    response = signed_in.get(reverse("job-estimate"), {"model": MODEL, "precision": "int8", "docs": 1000,
                                                         "chars": 4_000_000, "max_price_per_unit": str(per_unit)})
    # then the tokens are about a quarter of the characters plus two per document (capped by the context),
    assert response.status_code == 200
    tokens = min(1_000_000 + 2000, 1000 * ai_model.max_tokens)
    mops = mops_for_tokens(tokens=tokens, ops_per_token=ai_model.ops_per_token)
    estimate = response.context["estimate"]
    assert response.context["tokens"] == tokens and estimate.mops == mops
    # the cost is the work at the last price (rounded up to a cent) and at most the work at the bid,
    assert estimate.cost_at_last_price_minor == -(-mops * 400_000 // 10**13)
    assert estimate.cost_at_most_minor == -(-mops * estimate.max_price_micros // 10**13)
    # and only the cheap car's capacity counts at this bid.
    depth = market.market_depth(precision="int8")
    assert depth.cars == 2 and estimate.rate_at_bid == depth.rate_at(100_000) < depth.total_rate
    assert estimate.seconds == pytest.approx(mops / estimate.rate_at_bid)
    assert "at most" in response.content.decode()


def test_the_estimate_says_when_no_car_offers_at_or_below_the_bid(signed_in):
    VehicleFactory()  # reserve 100,000 µ$/PetaOp
    response = signed_in.get(reverse("job-estimate"), {"model": MODEL, "precision": "int8", "docs": 10, "chars": 1000,
                                                         "max_price_per_unit": "0.000001"})
    assert response.context["estimate"].bid_below_supply
    assert "No car offers INT8 capacity at or below your bid" in response.content.decode()


def test_a_bad_estimate_request_is_a_400_that_names_the_problem(signed_in):
    response = signed_in.get(reverse("job-estimate"), {"model": MODEL, "precision": "int8", "docs": 0, "chars": -1})
    assert response.status_code == 400
    assert "docs" in response.content.decode() and "max_price_per_unit" in response.content.decode()


def test_the_job_page_shows_units_tokens_and_cars_working(signed_in, make_job):
    job = make_job(docs=24)  # 3 units of 8
    car = VehicleFactory()
    units = list(WorkUnit.objects.filter(job=job).order_by("seq"))
    WorkUnit.objects.filter(pk=units[0].pk).update(state=WorkUnit.State.DONE)
    WorkUnit.objects.filter(pk=units[1].pk).update(state=WorkUnit.State.LEASED, leased_to=car, lease_expires_at=future())
    job.units_done = 1
    job.save(update_fields=["units_done"])
    response = signed_in.get(reverse("job-detail", args=[job.pk]), {"fragment": "1"})
    progress = response.context["progress"]
    assert (progress.units_done, progress.units_total, progress.cars_working, progress.pct) == (1, 3, 1, 33)
    assert progress.tokens_done == units[0].tokens and progress.mops_left == units[1].mops + units[2].mops
    assert 'data-testid="cars-working">1<' in response.content.decode()


def test_results_download_streams_json_lines_in_input_order(signed_in, make_job):
    job = make_job(docs=10)
    response = signed_in.get(reverse("job-results", args=[job.pk]))
    assert response.streaming and response["Content-Type"] == "application/x-ndjson"
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert [line.split(",")[0] for line in lines] == [f'{{"index":{i}' for i in range(10)]


def test_a_member_adds_a_colleague_who_gets_a_link_to_set_a_password(signed_in, buyer, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = signed_in.post(reverse("team"), {"email": "Grace@Hopper.example"})
    assert response.status_code == 302
    colleague = User.objects.get(email="grace@hopper.example")
    assert colleague.organisation == buyer.organisation and colleague.is_buyer and not colleague.has_usable_password()
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["grace@hopper.example"]
    assert "/accounts/password/reset/key/" in mail.outbox[0].body and buyer.organisation.name in mail.outbox[0].subject
    page = signed_in.get(reverse("team")).content.decode()
    assert "grace@hopper.example" in page and "invited" in page


def test_an_address_that_has_an_account_is_refused_with_a_message(signed_in):
    other = BuyerFactory()
    response = signed_in.post(reverse("team"), {"email": other.email})
    assert response.status_code == 200 and "already has an account" in response.content.decode()
    other.refresh_from_db()
    assert other.organisation_id != signed_in.get(reverse("team")).context["organisation"].pk


def test_the_last_member_cannot_leave_but_a_colleague_can_be_removed(signed_in, buyer):
    response = signed_in.post(reverse("team-member-remove", args=[buyer.pk]), follow=True)
    assert "The last member cannot be removed" in response.content.decode()
    buyer.refresh_from_db()
    assert buyer.is_active and buyer.organisation_id is not None
    colleague = BuyerFactory(organisation=buyer.organisation)
    signed_in.post(reverse("team-member-remove", args=[colleague.pk]))
    colleague.refresh_from_db()
    assert not colleague.is_active and colleague.organisation_id is None and not colleague.is_buyer


def test_the_market_page_shows_aggregates_and_never_a_bid_or_buyer(client, make_job):
    job = make_job(docs=8)
    Job.objects.filter(pk=job.pk).update(max_price_micros=7_654_321)
    VehicleFactory()
    AuctionRound.objects.create(market="int8", cleared_at=timezone.now(), interval_s=2, clearing_price_micros=123_456,
                                offered_mops=1000, sold_mops=250,
                                journal={"bids": [{"id": job.pk, "price": 7_654_321, "quantity": 10}]})
    response = client.get(reverse("market"))
    page = response.content.decode()
    assert response.status_code == 200
    assert "123,456" in page and "25 % of offered capacity sold" in page and "1 car offering now" in page
    assert "7654321" not in page and "7,654,321" not in page and job.organisation.name not in page
    depth = response.context["depth_data"]
    assert [d["market"] for d in depth] == ["int8", "fp16", "fp32"] and depth[0]["steps"][0][0] == 100_000


def test_the_market_page_has_empty_states_before_any_round(client):
    page = client.get(reverse("market")).content.decode()
    assert "No rounds yet" in page and "No car is offering capacity right now" in page
