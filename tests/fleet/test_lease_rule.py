"""The lease path obeys the one rule: over random owner limits and car states, a car gets a lease exactly
when fleet.eligibility says it may work (and capacity was sold to it)."""

from datetime import timedelta

from django.utils import timezone
from hypothesis import given, settings, strategies as st
from hypothesis.extra.django import TestCase

from fleet import services
from fleet.models import Vehicle, WorkUnit
from fleet.selectors import vehicle_decision
from marketplace import corpus, flows
from tests.conftest import SLOW_EXAMPLES, jsonl
from tests.factories import BuyerFactory, VehicleFactory, future

maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731


class LeaseFollowsTheRule(TestCase):
    @settings(SLOW_EXAMPLES, deadline=None)  # about a second each (a job and a fleet per example)
    @given(battery=st.floats(0, 100), floor=st.integers(0, 60), driving=st.booleans(), on_wifi=st.booleans(),
           plugged_in=st.booleans(), wifi_only=st.booleans(), plugged_in_only=st.booleans(), paused=st.booleans(),
           temp=maybe(st.floats(0, 60)), max_temp=maybe(st.floats(20, 50)), seen_s_ago=st.integers(0, 40),
           zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
           window_hours=maybe(st.tuples(st.integers(0, 23), st.integers(1, 23))))
    def test_a_lease_is_granted_exactly_when_the_rule_allows_work(self, battery, floor, driving, on_wifi, plugged_in,
                                                                  wifi_only, plugged_in_only, paused, temp, max_temp,
                                                                  seen_s_ago, zone, window_hours):
        buyer = BuyerFactory()
        flows.job_create(organisation=buyer.organisation, user=buyer, model_slug="all-minilm-l6-v2",
                          precision="int8", max_price_micros=10**7, deadline=future(),
                          inputs=jsonl(corpus.documents(8)).splitlines(keepends=True))
        car = VehicleFactory(policy__reserve_price_micros=0)
        flows.auction_tick()  # the car is eligible now: it wins the capacity
        windows = [] if window_hours is None else [
            {"weekday": d, "start": f"{window_hours[0]:02d}:00", "end": f"{(window_hours[0] + window_hours[1]) % 24:02d}:00"}
            for d in range(7)]
        services.policy_update(vehicle=car, battery_floor_pct=floor, battery_resume_pct=floor + 5, wifi_only=wifi_only,
                               plugged_in_only=plugged_in_only, paused=paused, max_temp_c=max_temp, timezone=zone,
                               windows=windows)
        Vehicle.objects.filter(pk=car.pk).update(battery_pct=battery, driving=driving, on_wifi=on_wifi,
                                                 plugged_in=plugged_in, temp_c=temp,
                                                 last_seen_at=timezone.now() - timedelta(seconds=seen_s_ago))

        units, reason = flows.units_lease(vehicle_id=car.pk)

        decision = vehicle_decision(vehicle=Vehicle.objects.select_related("policy", "hardware").get(pk=car.pk),
                                    now=timezone.now())
        # An eligible car gets work, unless it cannot finish a unit before it must stop (fleet.dispatch).
        assert bool(units) == decision.ok or (decision.ok and reason == "leaving_soon"), (reason, decision)
        if not decision.ok:
            assert reason == decision.reason
            assert not WorkUnit.objects.filter(leased_to=car, state=WorkUnit.State.LEASED).exists()
