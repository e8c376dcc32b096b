"""The owner's web portal with Django's test client: the dashboard, a car's page, its limits form and the
buttons that act on a car; and who may see them (owners their own cars only)."""

import base64
from datetime import timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import MeterRecord
from fleet import services
from fleet.models import OwnerPolicy, Vehicle, WorkUnit
from fleet.portal import energy_text
from marketplace import flows
from tests.factories import BuyerFactory, OrganisationFactory, OwnerFactory, VehicleFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner():
    return OwnerFactory()


@pytest.fixture
def car(owner):
    return VehicleFactory(owner=owner, name="Blue Model Y")


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner)
    return client


def lease_one(vehicle) -> WorkUnit:
    flows.auction_tick()
    units, why = flows.units_lease(vehicle_id=vehicle.pk, max_units=1)
    assert units, why
    return units[0]


def complete(vehicle, unit: WorkUnit) -> None:
    rng = np.random.default_rng(unit.pk)
    vectors = []
    for _ in unit.inputs:
        v = rng.normal(size=unit.job.ai_model.dims).astype("<f4")
        vectors.append(base64.b64encode((v / np.linalg.norm(v)).astype("<f4").tobytes()).decode())
    accepted, why = flows.unit_complete(vehicle_id=vehicle.pk, unit_id=unit.pk, epoch=unit.lease_epoch,
                                           result=vectors)
    assert accepted, why


def limits_data(*, windows=(), departures=(), one_offs=(), rows: int = 7, **fields) -> dict:
    """A complete POST of the limits form: sensible values, ``fields`` overriding them."""
    data = {"battery_floor_pct": "20", "battery_resume_pct": "30", "timezone": "Europe/Paris",
            "daily_energy_kwh": "", "monthly_energy_kwh": "", "daily_data_mb": "", "wifi_only": "on",
            "max_temp_c": "", "categories_mode": "all", "reserve_price_micros": "0"}
    data.update({k: v for k, v in fields.items() if v is not None})
    for name in [k for k, v in fields.items() if v is None]:
        data.pop(name, None)
    for prefix, given in (("windows", windows), ("departures", departures), ("one_offs", one_offs)):
        data[f"{prefix}-TOTAL_FORMS"] = str(max(rows, len(given)))
        data[f"{prefix}-INITIAL_FORMS"] = "0"
        for i, row in enumerate(given):
            data.update({f"{prefix}-{i}-{key}": str(value) for key, value in row.items()})
    return data


def page_text(response) -> str:
    return response.content.decode()


# --- the dashboard ---------------------------------------------------------------------------------------

def test_the_dashboard_links_each_car_to_its_page_and_serves_a_live_table_fragment(owner_client, car):
    # Given an owner with a car, when they open the dashboard,
    response = owner_client.get(reverse("owner-dashboard"))

    # then the car links to its page and the table is set to refresh from its fragment,
    html = page_text(response)
    assert f'href="{reverse("vehicle-detail", args=[car.pk])}"' in html
    assert 'data-refresh-url="/owner/?fragment=cars"' in html and "js/refresh.js" in html
    assert "Pause all" in html and "Resume all" not in html

    # and the fragment is the table alone, with the car's status.
    fragment = page_text(owner_client.get(reverse("owner-dashboard"), {"fragment": "cars"}))
    assert "<html" not in fragment and f'data-testid="car-{car.pk}"' in fragment
    assert "Parked and idle" in fragment


def test_pause_all_pauses_every_car_of_the_owner_only_and_withdraws_their_work(owner_client, owner, car, make_job):
    # Given two cars of the owner, one of them working, and another owner's car,
    other_car = VehicleFactory(owner=owner)
    stranger = VehicleFactory()
    make_job(docs=8)
    unit = lease_one(car)

    # when the owner pauses all,
    response = owner_client.post(reverse("vehicles-pause-all"), follow=True)

    # then both their cars are paused, the working one's unit is back in the queue, the stranger's car is not,
    assert set(OwnerPolicy.objects.filter(vehicle__in=[car, other_car]).values_list("paused", flat=True)) == {True}
    assert not OwnerPolicy.objects.get(vehicle=stranger).paused
    assert WorkUnit.objects.get(pk=unit.pk).state == WorkUnit.State.QUEUED
    assert "2 cars paused" in page_text(response) and "Resume all" in page_text(response)

    # and resume all brings them back.
    response = owner_client.post(reverse("vehicles-resume-all"), follow=True)
    assert set(OwnerPolicy.objects.filter(vehicle__in=[car, other_car]).values_list("paused", flat=True)) == {False}
    assert "2 cars available again" in page_text(response)


# --- the car page ---------------------------------------------------------------------------------------

def test_the_car_page_shows_status_current_work_usage_earnings_and_the_30_day_chart(owner_client, car, make_job):
    # Given a car that completed one unit today and holds another,
    make_job(docs=40)
    done = lease_one(car)
    complete(car, done)
    held = lease_one(car)
    record = MeterRecord.objects.get(unit=done)

    # when its owner opens its page,
    response = owner_client.get(reverse("vehicle-detail", args=[car.pk]))
    html = page_text(response)

    # then it is working on the held unit's job, since the lease began,
    assert response.status_code == 200
    assert 'data-testid="car-status">Working<' in html
    assert f"Job #{held.job_id}" in html and held.leased_at.strftime("%H:%M:%S") in html
    # energy today and this month, the unit completed and its earnings (owner's share, in cents) are shown,
    energy = energy_text(record.energy_mwh / 10**6)
    assert f'data-testid="energy-today">{energy}<' in html and f'data-testid="energy-month">{energy}<' in html
    assert 'data-testid="units-done">1<' in html
    cents = record.owner_femto // 10**13 / 100
    assert f'data-testid="car-earnings">{cents:,.2f} ¢<' in html
    # and the chart has 30 days per panel, today's bar carrying the unit.
    assert html.count("<rect ") == 60
    assert "1 unit" in html and "Energy per day over the last 30 days: 1 day with work" in html


def test_the_car_page_explains_a_limit_in_plain_words_and_the_next_departure(owner_client, car):
    # Given a car that left WiFi, with a departure on Tuesdays,
    Vehicle.objects.filter(pk=car.pk).update(on_wifi=False)
    services.policy_update(vehicle=car, timezone="Europe/Paris",
                           departures=[{"weekday": 1, "at": "07:30", "charge_pct": 70}])

    # when the owner opens its page,
    html = page_text(owner_client.get(reverse("vehicle-detail", args=[car.pk])))

    # then it says why it is limited, and when it must be ready with which charge.
    assert 'data-testid="car-status">Limited<' in html
    assert "Not on WiFi, and you allow work on WiFi only." in html
    assert "Tuesday" in html and "07:30" in html and "keep <strong>70 %</strong> charge" in html


def test_the_live_fragment_is_the_status_block_alone(owner_client, car):
    services.policy_update(vehicle=car, paused=True)
    fragment = page_text(owner_client.get(reverse("vehicle-detail", args=[car.pk]), {"fragment": "live"}))
    assert "<html" not in fragment and 'data-testid="car-status">Paused<' in fragment
    assert "You paused it." in fragment


def test_pause_on_the_car_page_withdraws_its_work_and_returns_to_the_car_page(owner_client, car, make_job):
    # Given a working car,
    make_job(docs=8)
    unit = lease_one(car)
    url = reverse("vehicle-detail", args=[car.pk])

    # when its owner presses Pause on its page,
    response = owner_client.post(reverse("vehicle-pause", args=[car.pk]), {"next": url})

    # then they are back on the car page, which says paused, and the car holds nothing.
    assert response.status_code == 302 and response.url == url
    assert 'data-testid="car-status">Paused<' in page_text(owner_client.get(url))
    assert not WorkUnit.objects.filter(leased_to=car, state=WorkUnit.State.LEASED).exists()
    assert WorkUnit.objects.get(pk=unit.pk).state == WorkUnit.State.QUEUED

    # A "next" pointing elsewhere is ignored.
    response = owner_client.post(reverse("vehicle-resume", args=[car.pk]), {"next": "https://evil.example/"})
    assert response.url == reverse("owner-dashboard")


def test_a_new_pairing_code_is_shown_on_the_car_page_once(owner_client, car):
    url = reverse("vehicle-detail", args=[car.pk])
    response = owner_client.post(reverse("vehicle-pairing-code", args=[car.pk]), {"next": url}, follow=True)
    html = page_text(response)
    assert 'data-testid="pairing-code"' in html and "python -m fleet.agent --server http://testserver --pair" in html
    assert 'data-testid="pairing-code"' not in page_text(owner_client.get(url))


def test_rotating_the_token_shows_the_new_one_once_with_the_agent_command(owner_client, car):
    # When the owner rotates the car's token,
    response = owner_client.post(reverse("vehicle-rotate-token", args=[car.pk]), follow=True)
    html = page_text(response)

    # then the page shows it with the command that starts the agent, and it authenticates the car;
    token = html.split('data-testid="new-token">')[1].split("<")[0]
    assert services.device_authenticate(token=token) == car
    assert f"python -m fleet.agent --server http://testserver --token {token}" in html
    # it is never shown again.
    assert token not in page_text(owner_client.get(reverse("vehicle-detail", args=[car.pk])))

    # When they revoke it, it stops working.
    response = owner_client.post(reverse("vehicle-revoke-token", args=[car.pk]), follow=True)
    assert services.device_authenticate(token=token) is None
    assert "token is revoked" in page_text(response)


def test_removing_a_car_asks_first_then_keeps_its_history(owner_client, car, make_job):
    # Given a car with a completed unit,
    make_job(docs=8)
    complete(car, lease_one(car))
    url = reverse("vehicle-remove", args=[car.pk])

    # when its owner opens the removal page, they are asked to confirm and nothing happens yet;
    html = page_text(owner_client.get(url))
    assert "Remove Blue Model Y?" in html and "1 unit it computed" in html
    assert Vehicle.objects.get(pk=car.pk).removed_at is None

    # when they confirm, the car is gone from their pages, and its history stays.
    response = owner_client.post(url, follow=True)
    assert "Blue Model Y is removed" in page_text(response)
    assert Vehicle.objects.get(pk=car.pk).removed_at is not None
    assert MeterRecord.objects.filter(vehicle=car).count() == 1
    assert owner_client.get(reverse("vehicle-detail", args=[car.pk])).status_code == 404


# --- the limits form ---------------------------------------------------------------------------------------

def test_the_limits_form_shows_every_group_with_help_and_the_current_values(owner_client, car):
    services.policy_update(vehicle=car, battery_floor_pct=25, battery_resume_pct=40,
                           windows=[{"weekday": 2, "start": "09:00", "end": "17:00"}])
    html = page_text(owner_client.get(reverse("vehicle-limits", args=[car.pk])))
    for group in ("Battery and departures", "When", "Budgets", "Network and power", "What it may run", "Price"):
        assert f">{group}</h2>" in html
    assert 'name="battery_floor_pct" value="25"' in html and 'name="battery_resume_pct" value="40"' in html
    assert 'value="09:00"' in html and '<option value="2" selected>Wednesday</option>' in html
    assert "switch on and off around one level" in html  # the resume level explained
    assert '<option value="Europe/Paris">Europe/Paris</option>' in html


def test_the_limits_form_saves_valid_input_through_the_policy_service(owner_client, car):
    # Given a buyer organisation the owner wants to avoid,
    shady = OrganisationFactory(name="Shady Ads Ltd")
    tomorrow = (timezone.now().astimezone(ZoneInfo("Europe/Paris")) + timedelta(days=1)).replace(second=0, microsecond=0)

    # when the owner saves a full set of limits,
    response = owner_client.post(reverse("vehicle-limits", args=[car.pk]), limits_data(
        battery_floor_pct="20", battery_resume_pct="30", timezone="Europe/Paris", daily_energy_kwh="2.5",
        monthly_energy_kwh="40", daily_data_mb="500", wifi_only=None, plugged_in_only="on", max_temp_c="45",
        categories_mode="only", categories=["embedding", "classification"], blocked_organisations=[str(shady.pk)],
        reserve_price_micros="1500",
        windows=[{"weekday": 0, "start": "22:00", "end": "06:00"}],
        departures=[{"weekday": 1, "at": "07:30", "charge_pct": 70}],
        one_offs=[{"at": tomorrow.strftime("%Y-%m-%dT%H:%M"), "charge_pct": 90}]), follow=True)

    # then they are told so (nothing was merged), and the policy holds exactly what they entered.
    html = page_text(response)
    assert "Limits saved; they apply now." in html and "windows were merged" not in html
    policy = OwnerPolicy.objects.get(vehicle=car)
    assert (policy.battery_floor_pct, policy.battery_resume_pct, policy.timezone) == (20, 30, "Europe/Paris")
    assert (policy.daily_energy_kwh, policy.monthly_energy_kwh, policy.daily_data_mb) == (2.5, 40, 500)
    assert (policy.wifi_only, policy.plugged_in_only, policy.max_temp_c) == (False, True, 45)
    assert policy.categories == ["embedding", "classification"]
    assert list(policy.blocked_organisations.all()) == [shady]
    assert policy.reserve_price_micros == 1500
    assert policy.windows == [{"weekday": 0, "start": "22:00", "end": "06:00"}]
    assert policy.departures == [{"weekday": 1, "at": "07:30", "charge_pct": 70}]
    assert policy.one_off_departures == [{"at": tomorrow.isoformat(), "charge_pct": 90}]


def test_a_resume_level_at_or_below_the_stop_level_is_refused_on_the_page_and_changes_nothing(owner_client, car):
    # Given the car's current limits,
    before = OwnerPolicy.objects.get(vehicle=car)

    # when the owner asks to stop at 40 % and resume above 30 % (and changes other limits in the same save),
    response = owner_client.post(reverse("vehicle-limits", args=[car.pk]), limits_data(
        battery_floor_pct="40", battery_resume_pct="30", wifi_only=None, reserve_price_micros="999",
        windows=[{"weekday": 3, "start": "08:00", "end": "12:00"}]))

    # then the page is shown again with the service's message at the top and next to the resume level,
    html = page_text(response)
    assert response.status_code == 200
    assert "The resume level must be above the stop level" in html
    assert 'id="id_battery_resume_pct_error"' in html and "Set it above 40 %." in html
    # and nothing changed.
    after = OwnerPolicy.objects.get(vehicle=car)
    assert (after.battery_floor_pct, after.battery_resume_pct, after.wifi_only, after.reserve_price_micros,
            after.windows) == (before.battery_floor_pct, before.battery_resume_pct, before.wifi_only,
                               before.reserve_price_micros, before.windows)


def test_overlapping_windows_are_merged_and_the_owner_is_told(owner_client, car):
    response = owner_client.post(reverse("vehicle-limits", args=[car.pk]), limits_data(windows=[
        {"weekday": 0, "start": "18:00", "end": "22:00"}, {"weekday": 0, "start": "21:00", "end": "06:00"},
        {"weekday": 4, "start": "09:00", "end": "12:00"}]), follow=True)
    assert "Overlapping windows were merged: Mon 18:00–06:00 next day, Fri 09:00–12:00." in page_text(response)
    assert OwnerPolicy.objects.get(vehicle=car).windows == [{"weekday": 0, "start": "18:00", "end": "06:00"},
                                                            {"weekday": 4, "start": "09:00", "end": "12:00"}]


@pytest.mark.parametrize("fields, field_id, message", [
    ({"timezone": "Mars/Olympus"}, "id_timezone_error", "Select a valid choice"),
    ({"battery_floor_pct": "120"}, "id_battery_floor_pct_error", "Enter a percentage from 0 to 100."),
    ({"daily_energy_kwh": "-1"}, "id_daily_energy_kwh_error", "Enter a positive number of kWh, or leave it empty"),
    ({"daily_data_mb": "0"}, "id_daily_data_mb_error", "Enter a positive number of MB"),
    ({"categories_mode": "only"}, "id_categories_error", "Tick at least one kind of work"),
    ({"windows": [{"weekday": 0, "start": "25:00", "end": "06:00"}]}, None, "Enter a valid time, such as 07:30."),
    ({"windows": [{"weekday": 0, "start": "08:00"}]}, None, "Give the day, the start and the end of this window"),
    ({"departures": [{"weekday": 1, "at": "07:30", "charge_pct": 150}]}, None, "Enter a percentage from 0 to 100."),
    ({"one_offs": [{"at": "2001-01-01T08:00", "charge_pct": 80}]}, None, "This time has passed"),
])
def test_invalid_limits_are_explained_next_to_the_field_and_change_nothing(owner_client, car, fields, field_id, message):
    before = OwnerPolicy.objects.get(vehicle=car)
    response = owner_client.post(reverse("vehicle-limits", args=[car.pk]), limits_data(**fields))
    html = page_text(response)
    assert response.status_code == 200 and message in html
    assert "The limits were not saved" in html
    if field_id:
        assert f'id="{field_id}"' in html
    after = OwnerPolicy.objects.get(vehicle=car)
    assert (after.timezone, after.battery_floor_pct, after.windows, after.departures) == (
        before.timezone, before.battery_floor_pct, before.windows, before.departures)


# --- who may see what -------------------------------------------------------------------------------------

CAR_URLS = [("get", "vehicle-detail"), ("get", "vehicle-limits"), ("post", "vehicle-limits"),
            ("post", "vehicle-pause"), ("post", "vehicle-resume"), ("post", "vehicle-pairing-code"),
            ("post", "vehicle-rotate-token"), ("post", "vehicle-revoke-token"), ("get", "vehicle-remove"),
            ("post", "vehicle-remove")]
OWNER_URLS = [("get", "owner-dashboard", False), ("post", "owner-dashboard", False),
              ("post", "vehicles-pause-all", False), ("post", "vehicles-resume-all", False)] + [
    (method, name, True) for method, name in CAR_URLS]


def _url(name: str, with_car: bool, car) -> str:
    return reverse(name, args=[car.pk]) if with_car else reverse(name)


def _unchanged(car) -> bool:
    fresh = Vehicle.objects.select_related("policy").get(pk=car.pk)
    return (fresh.removed_at is None and fresh.token_revoked_at is None and fresh.token_hash == car.token_hash
            and not fresh.policy.paused and fresh.pairing_code_hash == car.pairing_code_hash)


@pytest.mark.parametrize("method, name, with_car", OWNER_URLS)
def test_anonymous_visitors_are_sent_to_sign_in(client, car, method, name, with_car):
    url = _url(name, with_car, car)
    response = getattr(client, method)(url)
    assert response.status_code == 302 and response.url.startswith(reverse("account_login"))
    assert _unchanged(car)


@pytest.mark.parametrize("method, name, with_car", OWNER_URLS)
def test_buyers_are_refused_every_owner_page(client, car, method, name, with_car):
    client.force_login(BuyerFactory())
    response = getattr(client, method)(_url(name, with_car, car))
    assert response.status_code == 403
    assert _unchanged(car)


@pytest.mark.parametrize("method, name", CAR_URLS)
def test_another_owners_car_is_not_found(client, car, method, name):
    client.force_login(OwnerFactory())
    response = getattr(client, method)(reverse(name, args=[car.pk]), limits_data() if name == "vehicle-limits" else {})
    assert response.status_code == 404
    assert "Blue Model Y" not in page_text(response)
    assert _unchanged(car)


def test_another_owners_cars_are_not_on_the_dashboard_nor_paused_by_pause_all(client, car):
    client.force_login(OwnerFactory())
    assert "Blue Model Y" not in page_text(client.get(reverse("owner-dashboard")))
    assert "Blue Model Y" not in page_text(client.get(reverse("owner-dashboard"), {"fragment": "cars"}))
    client.post(reverse("vehicles-pause-all"))
    assert _unchanged(car)


# --- the page helpers ---------------------------------------------------------------------------------------

def test_daily_series_counts_work_on_the_owners_calendar_day(car, make_job):
    # Given a unit completed at 03:30 UTC yesterday, which is still the evening before in New York,
    from unittest import mock

    from fleet import portal

    make_job(docs=8)
    unit = lease_one(car)
    yesterday = timezone.now() - timedelta(days=1)
    at = yesterday.replace(hour=3, minute=30, second=0, microsecond=0)
    with mock.patch("django.utils.timezone.now", return_value=at):
        complete(car, unit)
    record = MeterRecord.objects.get(unit=unit)

    # when the 30-day series is drawn for an owner in New York and for one in UTC,
    new_york = portal.daily_series(vehicle=car, tz="America/New_York", now=timezone.now())
    utc = portal.daily_series(vehicle=car, tz="UTC", now=timezone.now())

    # then the unit counts on the evening before in New York, and on its own day in UTC; every day is listed.
    assert len(new_york) == len(utc) == 30
    busy_ny = [d for d in new_york if d.units]
    busy_utc = [d for d in utc if d.units]
    assert [d.day for d in busy_ny] == [at.astimezone(ZoneInfo("America/New_York")).date()]
    assert [d.day for d in busy_utc] == [at.date()]
    assert busy_ny[0].earnings_femto == record.owner_femto and busy_ny[0].energy_kwh == record.energy_mwh / 10**6


@pytest.mark.parametrize("kwh, text", [(0, "0 Wh"), (0.00004, "0.040 Wh"), (0.0025, "2.5 Wh"), (0.45, "450 Wh"),
                                       (12.345, "12.35 kWh")])
def test_energy_reads_in_the_unit_that_fits(kwh, text):
    assert energy_text(kwh) == text


@pytest.mark.parametrize("window, text", [
    ({"weekday": 0, "start": "22:00", "end": "06:00"}, "Monday 22:00–06:00 next day"),
    ({"weekday": 4, "start": "09:00", "end": "17:00"}, "Friday 09:00–17:00"),
    ({"weekday": 6, "start": "00:00", "end": "00:00"}, "Sunday all day"),
    ({"weekday": 2, "start": "18:00", "end": "00:00"}, "Wednesday 18:00–00:00"),
])
def test_windows_are_said_in_words(window, text):
    from fleet.portal import window_text

    assert window_text(window) == text
