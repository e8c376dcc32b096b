import pytest
from hypothesis import given, strategies as st

from billing.money import (charge_femto, femto_per_minor, femto_to_minor_with_carry,
                           price_per_million_tokens_micros, split_revenue)

pytestmark = pytest.mark.pure  # no database, layer or broker: the same code in every profile


@given(st.integers(0, 10**15), st.integers(0, 10_000))
def test_split_always_adds_up_to_the_charge_and_the_owner_gets_the_fee_complement(charge, fee_bps):
    owner, platform = split_revenue(charge=charge, fee_bps=fee_bps)
    assert owner + platform == charge
    assert owner == charge * (10_000 - fee_bps) // 10_000
    assert platform >= 0


@given(st.lists(st.integers(0, 10**14), max_size=50))
def test_carry_conversion_loses_nothing(amounts):
    carry, booked = 0, 0
    for amount in amounts:
        minor, carry = femto_to_minor_with_carry(femto=amount, carry=carry, currency="usd")
        booked += minor
        assert 0 <= carry < femto_per_minor("usd")
    assert booked * femto_per_minor("usd") + carry == sum(amounts)


def test_charge_is_exact_integer_arithmetic():
    # 21,600 mega-ops at 2,000,000 micro-dollars per 10^15 ops = 4.32e-5 dollars = 4.32e10 femto-dollars.
    assert charge_femto(mops=21_600, price_micros=2_000_000) == 43_200_000_000
    assert price_per_million_tokens_micros(price_micros=2_000_000, ops_per_token=23_592_960) == 47_185


def test_femto_amounts_are_shown_to_hundredths_of_a_cent_rounded_down():
    from billing.money import format_femto_as_minor

    per_minor = femto_per_minor("usd")
    assert format_femto_as_minor(2 * per_minor + per_minor // 100 * 37 + 1, "usd") == "2.37"
    assert format_femto_as_minor(per_minor // 100 - 1, "usd") == "0.00"
    assert format_femto_as_minor(123_456 * per_minor, "usd") == "123,456.00"


def test_money_reads_as_people_write_it():
    from decimal import Decimal

    from billing.money import format_major, format_minor

    assert format_minor(123456, "usd") == "$1,234.56" and format_minor(-5, "eur") == "-€0.05"
    assert format_minor(1500, "jpy") == "¥1,500" and format_minor(0, "gbp") == "£0.00"
    assert format_major(Decimal("7.76549"), "usd", places=4) == "$7.7655"
