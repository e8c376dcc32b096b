"""The owner REST API: the same abilities as the portal, scoped to the owner's own cars."""

import pytest
from rest_framework.test import APIClient

from fleet import services
from fleet.models import OwnerPolicy, Vehicle, WorkUnit
from marketplace import flows
from tests.factories import BuyerFactory, OwnerFactory, VehicleFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return OwnerFactory()


@pytest.fixture
def client_for():
    def make(user):
        client = APIClient()
        client.force_authenticate(user)
        return client

    return make


def test_an_owner_adds_a_car_gets_a_pairing_code_and_sees_it(owner, client_for):
    api = client_for(owner)
    created = api.post("/api/v1/vehicles/", {"name": "Blue", "hardware": "HW4"}, format="json")
    assert created.status_code == 201 and len(created.json()["pairing_code"]) == 8
    car = api.get(f"/api/v1/vehicles/{created.json()['id']}/").json()
    assert car["status"] == "offline" and car["usage"]["energy_today_kwh"] == 0 and car["earnings_minor"] == 0
    assert car["policy"]["battery_floor_pct"] == 30


def test_limits_are_validated_merged_and_applied(owner, client_for):
    vehicle = VehicleFactory(owner=owner)
    api = client_for(owner)
    url = f"/api/v1/vehicles/{vehicle.pk}/policy/"
    refused = api.patch(url, {"battery_floor_pct": 50, "battery_resume_pct": 40}, format="json")
    assert refused.status_code == 400 and "battery_resume_pct" in refused.json()["error"]["fields"]
    bad_zone = api.patch(url, {"timezone": "Mars/Olympus"}, format="json")
    assert bad_zone.status_code == 400 and "timezone" in bad_zone.json()["error"]["fields"]
    ok = api.patch(url, {"timezone": "Europe/Berlin", "windows": [
        {"weekday": 0, "start": "18:00", "end": "22:00"}, {"weekday": 0, "start": "21:00", "end": "06:00"}],
        "departures": [{"weekday": 1, "at": "07:30", "charge_pct": 70}], "categories": ["embedding"]}, format="json")
    assert ok.status_code == 200, ok.content
    assert ok.json()["windows"] == [{"weekday": 0, "start": "18:00", "end": "06:00"}]
    policy = OwnerPolicy.objects.get(vehicle=vehicle)
    assert policy.timezone == "Europe/Berlin" and policy.departures == [{"weekday": 1, "at": "07:30", "charge_pct": 70.0}]


def test_blocking_a_buyer_withdraws_the_cars_leases_of_its_jobs(owner, client_for, make_job, buyer):
    vehicle = VehicleFactory(owner=owner)
    make_job(docs=8)
    flows.auction_tick()
    (unit, *_), _ = flows.units_lease(vehicle_id=vehicle.pk)
    response = client_for(owner).patch(f"/api/v1/vehicles/{vehicle.pk}/policy/",
                                       {"blocked_organisations": [buyer.organisation.slug]}, format="json")
    assert response.status_code == 200
    assert WorkUnit.objects.get(pk=unit.pk).state == "queued"


def test_pause_all_rotate_revoke_and_remove(owner, client_for):
    cars = [VehicleFactory(owner=owner) for _ in range(2)]
    api = client_for(owner)
    assert api.post("/api/v1/vehicles/pause-all/").json() == {"vehicles": 2}
    assert set(OwnerPolicy.objects.filter(vehicle__in=cars).values_list("paused", flat=True)) == {True}
    assert api.post("/api/v1/vehicles/resume-all/").json() == {"vehicles": 2}
    token = api.post(f"/api/v1/vehicles/{cars[0].pk}/rotate-token/").json()["token"]
    assert services.device_authenticate(token=token) == cars[0]
    assert api.post(f"/api/v1/vehicles/{cars[0].pk}/revoke-token/").status_code == 204
    assert services.device_authenticate(token=token) is None
    assert api.delete(f"/api/v1/vehicles/{cars[1].pk}/").status_code == 204
    assert Vehicle.objects.get(pk=cars[1].pk).removed_at is not None  # history stays
    assert [c["id"] for c in api.get("/api/v1/vehicles/").json()] == [cars[0].pk]


OWNER_URLS = [("get", "/api/v1/vehicles/{id}/"), ("delete", "/api/v1/vehicles/{id}/"),
              ("get", "/api/v1/vehicles/{id}/policy/"), ("patch", "/api/v1/vehicles/{id}/policy/"),
              ("post", "/api/v1/vehicles/{id}/pause/"), ("post", "/api/v1/vehicles/{id}/resume/"),
              ("post", "/api/v1/vehicles/{id}/pairing-code/"), ("post", "/api/v1/vehicles/{id}/rotate-token/"),
              ("post", "/api/v1/vehicles/{id}/revoke-token/")]


@pytest.mark.parametrize("method, url", OWNER_URLS)
def test_another_owners_car_is_not_found_and_anonymous_or_buyers_are_refused(method, url, client_for):
    theirs = VehicleFactory()
    path = url.format(id=theirs.pk)
    assert getattr(client_for(OwnerFactory()), method)(path).status_code == 404
    assert getattr(client_for(BuyerFactory()), method)(path).status_code == 403
    assert getattr(APIClient(), method)(path).status_code == 401
    assert Vehicle.objects.get(pk=theirs.pk).removed_at is None and not theirs.policy.paused


@pytest.mark.parametrize("method, url", [("get", "/api/v1/vehicles/"), ("post", "/api/v1/vehicles/pause-all/")])
def test_fleet_wide_endpoints_refuse_anonymous_and_buyers(method, url, client_for):
    assert getattr(APIClient(), method)(url).status_code == 401
    assert getattr(client_for(BuyerFactory()), method)(url).status_code == 403


def test_an_owner_api_key_reaches_the_owner_api_and_not_the_buyer_api(owner):
    import io

    from django.core.management import call_command

    vehicle = VehicleFactory(owner=owner)
    out = io.StringIO()
    call_command("issue_api_key", owner.email, stdout=out)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {out.getvalue().strip().splitlines()[-1]}")
    assert [c["id"] for c in api.get("/api/v1/vehicles/").json()] == [vehicle.pk]
    assert api.get("/api/v1/jobs/").status_code == 403
