"""A job's budget cap and history: the auction bids only for work the rest of the budget pays at the bid,
and every change to a job is in its history."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from hypothesis import given, strategies as st

from billing.money import femto_per_minor
from fleet.models import WorkUnit
from marketplace import flows, selectors, services
from marketplace.core.errors import ApplicationError
from marketplace.models import Job, JobEvent
from tests.factories import VehicleFactory, future

pytestmark = pytest.mark.django_db


@given(queued=st.integers(0, 10**7), price=st.integers(1, 10**8), left=st.integers(0, 10**15),
       unit=st.integers(1, 10**5))
def test_a_bid_never_commits_more_than_the_budget_left_even_with_one_more_unit(queued, price, left, unit):
    quantity = selectors.bid_quantity_mops(queued_mops=queued, max_price_micros=price, budget_left_femto=left,
                                           largest_unit_mops=unit)
    assert 0 <= quantity <= queued
    if quantity == queued:
        assert queued * price <= left  # all the work fits in the budget at the bid
    elif quantity:
        assert (quantity + unit) * price <= left  # the dispatcher's whole last unit still fits


def test_budget_left_is_the_reservation_less_charges_and_leased_units_at_their_price(make_job, buyer):
    job = make_job(docs=24, budget_cap=500)
    units = list(WorkUnit.objects.filter(job=job).order_by("seq"))
    car = VehicleFactory()
    WorkUnit.objects.filter(pk=units[0].pk).update(state=WorkUnit.State.LEASED, leased_to=car, price_micros=3_000_000,
                                                    lease_expires_at=future())
    other = make_job(docs=8)  # no cap: it reserved the cost of all its work at its bid
    left = selectors.jobs_budget_left_femto(job_ids=[job.pk, other.pk])
    per_minor = femto_per_minor("usd")
    assert left == {job.pk: 500 * per_minor - units[0].mops * 3_000_000,
                    other.pk: -(-other.mops_total * other.max_price_micros // per_minor) * per_minor}
    flows.job_cancel(job=other)  # released: it bids for nothing
    assert selectors.jobs_budget_left_femto(job_ids=[other.pk]) == {other.pk: 0}


def test_a_job_records_its_history_from_creation_to_cancellation(make_job, buyer):
    job = make_job(docs=8)
    flows.job_bid_update(job=job, max_price_micros=3_000_000, by=buyer)
    flows.job_budget_update(job=job, budget_cap_minor=1234, by=buyer)
    flows.job_cancel(job=job, by=buyer)
    events = list(job.events.values_list("kind", "by"))
    assert events == [(JobEvent.Kind.CREATED, buyer.pk), (JobEvent.Kind.BID_CHANGED, buyer.pk),
                      (JobEvent.Kind.BUDGET_CHANGED, buyer.pk), (JobEvent.Kind.CANCELLED, buyer.pk)]
    assert job.events.get(kind=JobEvent.Kind.BUDGET_CHANGED).detail == "from none to 1234 minor units"
    with pytest.raises(ApplicationError):
        flows.job_budget_update(job=job, budget_cap_minor=10)  # closed
    assert job.events.count() == 4


def test_budget_reached_is_noted_once_until_the_budget_changes(make_job, buyer):
    job = make_job(docs=8)
    flows.job_budget_update(job=job, budget_cap_minor=1)
    services.job_budget_reached(job_id=job.pk)
    services.job_budget_reached(job_id=job.pk)
    assert job.events.filter(kind=JobEvent.Kind.BUDGET_REACHED).count() == 1
    flows.job_budget_update(job=job, budget_cap_minor=2)
    services.job_budget_reached(job_id=job.pk)
    assert job.events.filter(kind=JobEvent.Kind.BUDGET_REACHED).count() == 2


def test_a_bad_budget_cap_is_refused_and_nothing_is_created(api, buyer):
    response = api.post("/api/v1/jobs/", {"model": "all-minilm-l6-v2", "precision": "int8", "max_price_micros": 10**6,
                                          "deadline": (timezone.now() + timedelta(hours=1)).isoformat(),
                                          "budget_cap_minor": 0, "inputs": [{"text": "a"}]}, format="json")
    assert response.status_code == 400 and "budget_cap_minor" in response.json()["error"]["fields"]
    assert not Job.objects.exists()


def test_the_api_sets_and_removes_a_budget_cap(api, make_job):
    job = make_job(docs=8)
    response = api.post(f"/api/v1/jobs/{job.pk}/budget/", {"budget_cap_minor": 5000}, format="json")
    assert response.status_code == 200 and response.json()["budget_cap_minor"] == 5000
    response = api.post(f"/api/v1/jobs/{job.pk}/budget/", {"budget_cap_minor": None}, format="json")
    assert response.status_code == 200 and response.json()["budget_cap_minor"] is None
    assert api.post(f"/api/v1/jobs/{job.pk}/budget/", {"budget_cap_minor": -5}, format="json").status_code == 400


def test_the_job_page_changes_bid_and_budget_and_shows_the_history(client, buyer, make_job):
    client.force_login(buyer)
    job = make_job(docs=8)
    response = client.post(reverse("job-terms", args=[job.pk]), {"max_price_per_unit": "0.5", "budget_cap": "12.34"},
                           follow=True)
    job.refresh_from_db()
    assert job.budget_cap_minor == 1234 and job.max_price_micros > 2_000_000
    page = response.content.decode()
    assert "Bid changed" in page and "Budget changed" in page and "$12.34" in page
    # an empty budget removes the cap; an unchanged bid is not recorded again
    client.post(reverse("job-terms", args=[job.pk]), {"max_price_per_unit": "0.5", "budget_cap": ""})
    job.refresh_from_db()
    assert job.budget_cap_minor is None and job.events.filter(kind=JobEvent.Kind.BID_CHANGED).count() == 1
    # and sending the form back as shown changes nothing (the bid read back per million tokens is rounded)
    bid = job.max_price_micros
    shown = client.get(reverse("job-detail", args=[job.pk])).context["terms_form"]["max_price_per_unit"].value()
    client.post(reverse("job-terms", args=[job.pk]), {"max_price_per_unit": str(shown), "budget_cap": ""})
    job.refresh_from_db()
    assert job.max_price_micros == bid and job.events.count() == 4


def test_the_estimate_warns_when_the_budget_cap_is_below_the_cost_at_the_bid(client, buyer):
    client.force_login(buyer)
    response = client.get(reverse("job-estimate"), {"model": "all-minilm-l6-v2", "precision": "int8", "docs": 10000,
                                                      "chars": 40_000_000, "max_price_per_unit": "1", "budget_cap": "0.01"})
    assert response.status_code == 200 and 'data-testid="budget-warning"' in response.content.decode()


def test_the_auction_bids_a_capped_job_only_for_what_its_budget_pays_and_notes_when_it_cannot(make_job):
    VehicleFactory()
    price = 10**11  # dear enough that cents are fine-grained
    units = make_job(docs=80, price=price).units  # ten units, to measure them
    largest = max(units.values_list("mops", flat=True))
    per_minor = femto_per_minor("usd")
    cap = -(-(3 * largest * price + 5) // per_minor)  # three units' worth at the bid, and a little, in cents
    job = make_job(docs=80, price=price, budget_cap=cap)
    flows.job_cancel(job=Job.objects.exclude(pk=job.pk).get())
    (round_,) = flows.auction_tick()
    (bid,) = round_.journal["bids"]
    assert bid["quantity"] == cap * per_minor // price - largest < job.mops_total
    # a cap that cannot pay one more unit stops the bidding, and the history says so once
    flows.job_budget_update(job=job, budget_cap_minor=1)
    assert flows.auction_tick() == []
    flows.auction_tick()
    assert job.events.filter(kind=JobEvent.Kind.BUDGET_REACHED).count() == 1
