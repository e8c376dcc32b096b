"""Accounts and access, through Django's test client: sign-up by role, sign-in by email, sign-out, and who may
see which page (anonymous visitors are sent to sign in, the wrong role is refused, other people's things are
not found)."""

import pytest
from django.urls import reverse

from fleet.models import Vehicle
from marketplace import services
from marketplace.models import AIModel, Job, Organisation, User
from tests.factories import BuyerFactory, OwnerFactory, VehicleFactory, future

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery 9"
LOGIN_URL = reverse("account_login")


def sign_up(client, **fields):
    data = {"email": "new@example.com", "password1": PASSWORD, "password2": PASSWORD, "role": "owner",
            "organisation": "", **fields}
    return client.post(reverse("account_signup"), data)


def signed_in(client, user):
    """Sign ``user`` in. The row is read back first, so the session's password hash matches the database."""
    client.force_login(User.objects.get(pk=user.pk))
    return client


# --- sign-up ----------------------------------------------------------------------------------------------

def test_a_buyer_signs_up_with_a_new_organisation_and_is_signed_in(client, mailoutbox):
    # When a newcomer signs up as a buyer for "Acme Research",
    response = sign_up(client, email="ada@example.com", role="buyer", organisation="Acme Research")

    # then they are a buyer member of a new organisation of that name, signed in, sent to their dashboard,
    assert response.status_code == 302 and response.url == reverse("home")
    user = User.objects.get(email="ada@example.com")
    assert user.role == User.Role.BUYER and user.is_buyer
    assert user.organisation.name == "Acme Research" and user.organisation.slug == "acme-research"
    assert client.session["_auth_user_id"] == str(user.pk)
    home = client.get(reverse("home"))
    assert home.status_code == 302 and home.url == reverse("buyer-dashboard")
    # and asked (not forced) to confirm their address.
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["ada@example.com"]


def test_an_owner_signs_up_without_an_organisation_even_if_they_type_one(client):
    response = sign_up(client, email="grace@example.com", role="owner", organisation="Grace's garage")

    assert response.status_code == 302
    user = User.objects.get(email="grace@example.com")
    assert user.role == User.Role.OWNER and user.is_owner and not user.is_buyer
    assert user.organisation is None
    assert not Organisation.objects.exists()
    home = client.get(reverse("home"))
    assert home.status_code == 302 and home.url == reverse("owner-dashboard")


def test_a_buyer_sign_up_without_an_organisation_is_refused_with_a_message(client):
    response = sign_up(client, email="kay@example.com", role="buyer", organisation="   ")

    assert response.status_code == 200
    assert "Buyers sign up for an organisation: give its name." in response.content.decode()
    assert response.context["form"].errors["organisation"]
    assert not User.objects.filter(email="kay@example.com").exists()
    assert not Organisation.objects.exists()
    assert "_auth_user_id" not in client.session


# --- sign-in and sign-out ---------------------------------------------------------------------------------

@pytest.mark.parametrize("typed", ["ada@example.com", "Ada@Example.COM"])
def test_a_user_signs_in_with_their_email_address(client, typed):
    user = User.objects.create_user(email="ada@example.com", password=PASSWORD, role=User.Role.OWNER)

    response = client.post(LOGIN_URL, {"login": typed, "password": PASSWORD})

    assert response.status_code == 302 and response.url == reverse("home")
    assert client.session["_auth_user_id"] == str(user.pk)
    assert client.get(reverse("owner-dashboard")).status_code == 200


def test_a_wrong_password_does_not_sign_in(client):
    User.objects.create_user(email="ada@example.com", password=PASSWORD)

    response = client.post(LOGIN_URL, {"login": "ada@example.com", "password": "not the password 1"})

    assert response.status_code == 200
    assert "The email address and/or password you specified are not correct." in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_sign_out_asks_on_get_and_signs_out_on_post(client):
    owner = OwnerFactory()
    signed_in(client, owner)

    confirm = client.get(reverse("account_logout"))
    assert confirm.status_code == 200 and "Are you sure you want to sign out?" in confirm.content.decode()
    assert client.session["_auth_user_id"] == str(owner.pk)  # a link (or a prefetch) never signs anyone out

    response = client.post(reverse("account_logout"))

    assert response.status_code == 302 and response.url == reverse("home")
    assert "_auth_user_id" not in client.session
    assert client.get(reverse("owner-dashboard")).url.startswith(LOGIN_URL)


# --- who may see which page -------------------------------------------------------------------------------

@pytest.fixture
def things():
    """One buyer with a job and an API key, one owner with a car: the objects the pages are about."""
    buyer = BuyerFactory()
    job = Job.objects.create(organisation=buyer.organisation, created_by=buyer,
                             ai_model=AIModel.objects.get(slug="all-minilm-l6-v2"), precision="int8",
                             max_price_micros=1_000_000, deadline=future())
    key, _ = services.api_key_create(organisation=buyer.organisation, name="k", created_by=buyer)
    car = VehicleFactory()
    return {"buyer": buyer, "job": job, "key": key, "owner": car.owner, "car": car}


def buyer_pages(things):
    job, key = things["job"].pk, things["key"].pk
    member = things["buyer"].pk
    return [("get", reverse("buyer-dashboard")), ("get", reverse("job-new")), ("post", reverse("job-new")),
            ("get", reverse("job-estimate")), ("get", reverse("job-detail", args=[job])),
            ("get", reverse("job-results", args=[job])), ("post", reverse("job-cancel", args=[job])),
            ("post", reverse("job-terms", args=[job])),
            ("get", reverse("team")), ("post", reverse("team")), ("post", reverse("team-member-remove", args=[member])),
            ("post", reverse("api-key-create")), ("post", reverse("api-key-revoke", args=[key]))]


def owner_pages(things):
    car = things["car"].pk
    return [("get", reverse("owner-dashboard")), ("post", reverse("owner-dashboard")),
            ("post", reverse("vehicle-pause", args=[car])), ("post", reverse("vehicle-resume", args=[car])),
            ("post", reverse("vehicle-pairing-code", args=[car]))]


def test_every_owner_and_buyer_page_sends_anonymous_visitors_to_sign_in(client, things):
    for method, url in buyer_pages(things) + owner_pages(things):
        response = getattr(client, method)(url)
        assert response.status_code == 302, (method, url, response.status_code)
        assert response.url == f"{LOGIN_URL}?next={url}", (method, url)
    # and nothing changed on the way.
    things["car"].policy.refresh_from_db()
    things["job"].refresh_from_db()
    things["key"].refresh_from_db()
    assert not things["car"].policy.paused and things["job"].state == Job.State.QUEUED and things["key"].is_active


@pytest.mark.parametrize("role", ["owner", "operator"])
def test_buyer_pages_refuse_users_who_are_not_buyers(client, things, role):
    user = things["owner"] if role == "owner" else User.objects.create_superuser("ops@example.com", PASSWORD)
    signed_in(client, user)
    for method, url in buyer_pages(things):
        response = getattr(client, method)(url)
        assert response.status_code == 403, (method, url, response.status_code)
    things["job"].refresh_from_db()
    things["key"].refresh_from_db()
    assert things["job"].state == Job.State.QUEUED and things["key"].is_active


@pytest.mark.parametrize("role", ["buyer", "operator"])
def test_owner_pages_refuse_users_who_are_not_owners(client, things, role):
    user = things["buyer"] if role == "buyer" else User.objects.create_superuser("ops@example.com", PASSWORD)
    signed_in(client, user)
    for method, url in owner_pages(things):
        response = getattr(client, method)(url)
        assert response.status_code == 403, (method, url, response.status_code)
    things["car"].policy.refresh_from_db()
    assert not things["car"].policy.paused
    assert Vehicle.objects.count() == 1


def test_an_owner_cannot_pause_resume_or_pair_another_owners_car(client, things):
    signed_in(client, OwnerFactory())
    car = things["car"]
    for name in ("vehicle-pause", "vehicle-resume", "vehicle-pairing-code"):
        assert client.post(reverse(name, args=[car.pk])).status_code == 404, name
    car.refresh_from_db()
    car.policy.refresh_from_db()
    assert not car.policy.paused and car.pairing_code_hash == ""
    # while the car's own owner can.
    signed_in(client, car.owner)
    assert client.post(reverse("vehicle-pause", args=[car.pk])).status_code == 302
    car.policy.refresh_from_db()
    assert car.policy.paused


def test_a_buyer_cannot_see_cancel_or_revoke_another_organisations_things(client, things):
    signed_in(client, BuyerFactory())
    job, key = things["job"], things["key"]
    assert client.get(reverse("job-detail", args=[job.pk])).status_code == 404
    assert client.get(reverse("job-detail", args=[job.pk]), {"fragment": "1"}).status_code == 404
    assert client.post(reverse("job-cancel", args=[job.pk])).status_code == 404
    assert client.post(reverse("api-key-revoke", args=[key.pk])).status_code == 404
    assert client.get(reverse("job-results", args=[job.pk])).status_code == 404
    assert client.post(reverse("team-member-remove", args=[things["buyer"].pk])).status_code == 404
    things["buyer"].refresh_from_db()
    assert things["buyer"].is_active and things["buyer"].organisation_id == job.organisation_id
    dashboard = client.get(reverse("buyer-dashboard"))
    assert dashboard.status_code == 200 and reverse("job-detail", args=[job.pk]) not in dashboard.content.decode()
    job.refresh_from_db()
    key.refresh_from_db()
    assert job.state == Job.State.QUEUED and key.is_active
    # while a member of the job's organisation can see it.
    signed_in(client, things["buyer"])
    assert client.get(reverse("job-detail", args=[job.pk])).status_code == 200
