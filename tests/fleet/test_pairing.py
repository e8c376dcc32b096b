"""The agent's pairing endpoint (POST /api/v1/fleet/pair/) against guessing: failed attempts are throttled per
client address and per code prefix (429 in the API's stable error shape, with Retry-After), successes are not
counted, and after the window a right code pairs. A malformed body is a 400, never a 500."""

import random
import time

import pytest
from rest_framework.test import APIClient

from fleet import services, tokens
from fleet.api import PairingClientThrottle, PairingCodeThrottle, PairingThrottle
from fleet.models import HardwareGeneration
from tests.factories import OwnerFactory
from tests.marketplace.test_api import assert_error

pytestmark = pytest.mark.django_db

URL = "/api/v1/fleet/pair/"


def a_car() -> str:
    """A new car's one-time pairing code."""
    return services.vehicle_create(owner=OwnerFactory(), name="Car",
                                   hardware=HardwareGeneration.objects.get(code="HW4"))[1]


def an_ipv6_network() -> str:
    """A /64 of the documentation range of its own (the throttle counts live in the cache across tests)."""
    return f"2001:db8:{random.getrandbits(16):x}:{random.getrandbits(16):x}"


def a_guess(prefix: str = "") -> str:
    return prefix + "".join(random.choice(tokens.PAIRING_ALPHABET) for _ in range(8 - len(prefix)))


def pair(code, address: str):
    return APIClient().post(URL, {"code": code}, format="json", REMOTE_ADDR=address)


def assert_throttled(response) -> None:
    error = assert_error(response, 429, "throttled")
    assert 0 < int(response["Retry-After"]) <= 60 and error["retry_after_s"] == int(response["Retry-After"])


def after_the_window(monkeypatch) -> None:
    monkeypatch.setattr(PairingThrottle, "timer", staticmethod(lambda: time.time() + 61))


def test_120_quick_guesses_from_one_address_get_429_but_a_depots_pairings_are_not_counted(monkeypatch):
    network = an_ipv6_network()
    client, limit = f"{network}::7", PairingClientThrottle().num_requests
    # Given a depot that pairs a dozen cars from one address (successes are not counted),
    assert [pair(a_car(), client).status_code for _ in range(12)] == [201] * 12
    right = a_car()
    # when it guesses 120 times in a row,
    answers = [pair(a_guess(), client) for _ in range(120)]
    # then the first `limit` are wrong codes and the rest are refused, in the API's shape with Retry-After,
    assert [r.status_code for r in answers] == [400] * limit + [429] * (120 - limit)
    assert_error(answers[0], 400, "pairing_invalid")
    assert_throttled(answers[-1])
    # a right code too, and from another address of the same /64 network;
    assert_throttled(pair(right, client))
    assert_throttled(pair(a_guess(), f"{network}::8"))
    # another client is not held back;
    assert_error(pair(a_guess(), f"{an_ipv6_network()}::1"), 400, "pairing_invalid")
    # and once the window has passed, the right code pairs.
    after_the_window(monkeypatch)
    assert pair(right, client).status_code == 201


def test_guesses_at_one_code_prefix_from_many_addresses_get_429(monkeypatch):
    # Given someone who saw the first half of a car's code,
    right, limit = a_car(), PairingCodeThrottle().num_requests
    prefix = right[:PairingCodeThrottle.PREFIX]
    # when they try the other half from a new address each time,
    answers = [pair(a_guess(prefix), f"10.{random.getrandbits(8)}.{random.getrandbits(8)}.{i}") for i in range(limit + 3)]
    # then after `limit` failures that prefix is refused, whatever the address, in any spelling of it,
    assert [r.status_code for r in answers] == [400] * limit + [429] * 3
    assert_throttled(pair(f" {prefix.lower()}-{right[4:]} ", f"{an_ipv6_network()}::1"))
    # while other codes are not held back,
    assert pair(a_car(), f"{an_ipv6_network()}::1").status_code == 201
    # and once the window has passed, the right code pairs.
    after_the_window(monkeypatch)
    assert pair(right, f"{an_ipv6_network()}::1").status_code == 201


def test_a_pairing_body_nested_too_deep_is_a_400_not_a_500():
    def post(body: str):
        return APIClient().generic("POST", URL, body, content_type="application/json",
                                   REMOTE_ADDR=f"{an_ipv6_network()}::1")

    # The JSON parser's RecursionError was a 500 with a traceback; now it is bad JSON like any other,
    assert_error(post("[" * 30_000 + "]" * 30_000), 400, "parse_error")
    assert_error(post("{not json"), 400, "parse_error")
    # and a code that is not text (a lone surrogate) is refused by the serializer, before it is hashed.
    assert_error(post('{"code": "\\ud800ABCD2345"}'), 400, "invalid")
