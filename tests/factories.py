from datetime import timedelta

import factory
from django.utils import timezone

from billing.services import balance_grant
from fleet import workloads
from fleet.models import HardwareGeneration, OwnerPolicy, Vehicle
from marketplace.models import Organisation, User


class OrganisationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organisation
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"Org {n}")
    slug = factory.Sequence(lambda n: f"org-{n}")

    @factory.post_generation
    def credit(organisation, create, extracted, **kwargs):
        """Buyers pay in advance: an organisation starts with ``credit`` minor units (default $1,000) granted
        through the real ledger service; ``OrganisationFactory(credit=0)`` for one with nothing."""
        amount = 100_000 if extracted is None else extracted
        if create and amount:
            balance_grant(organisation=organisation, amount_minor=amount, note="test credit")


class BuyerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    email = factory.Sequence(lambda n: f"buyer{n}@example.com")
    role = User.Role.BUYER
    organisation = factory.SubFactory(OrganisationFactory)
    password = factory.django.Password("pw-for-tests-1")


class OwnerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        skip_postgeneration_save = True

    email = factory.Sequence(lambda n: f"owner{n}@example.com")
    role = User.Role.OWNER
    password = factory.django.Password("pw-for-tests-1")


class VehicleFactory(factory.django.DjangoModelFactory):
    """A connected, parked, charged car on WiFi that has said hello and asked for work (the auction offers only
    cars that did: ``work_requested_at=None`` for one that never asked). It has delivered nothing yet, so it is
    sold at the provisional rate until it has (tests.fleet.test_capacity_proven.deliver)."""

    class Meta:
        model = Vehicle
        skip_postgeneration_save = True

    owner = factory.SubFactory(OwnerFactory)
    name = factory.Sequence(lambda n: f"Car {n}")
    hardware = factory.LazyFunction(lambda: HardwareGeneration.objects.get(code="HW4"))
    connected = True
    last_seen_at = factory.LazyFunction(timezone.now)
    work_requested_at = factory.LazyFunction(timezone.now)
    battery_pct = 80.0
    on_wifi = True
    plugged_in = True
    runtimes = ["all-minilm-l6-v2"]
    tasks = factory.LazyFunction(lambda: list(workloads.WORKLOADS))
    throughput_mops = {"int8": 50_000, "fp32": 5_000}
    policy = factory.RelatedFactory("tests.factories.PolicyFactory", factory_related_name="vehicle")


class PolicyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = OwnerPolicy

    battery_floor_pct = 30
    wifi_only = True
    paused = False
    reserve_price_micros = 100_000


def future(hours: int = 4):
    return timezone.now() + timedelta(hours=hours)
