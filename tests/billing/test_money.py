from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from billing.money import (
    charge_femto,
    femto_per_minor,
    femto_to_minor_with_carry,
    major_to_micros,
    price_per_units_micros,
    split_revenue,
)

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
    assert price_per_units_micros(price_micros=2_000_000, ops_per_unit=23_592_960, per=10**6) == 47_185


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


# --- what a person types: the major unit, exactly, in minor units and back -----------------------------

@pytest.mark.parametrize(("typed", "currency", "minor"), [
    ("12.34", "usd", 1234), ("12.3", "eur", 1230), ("12", "gbp", 1200), ("0.01", "usd", 1), ("1.230", "usd", 123),
    ("1E+2", "usd", 10_000), ("-0.05", "eur", -5), ("1500", "jpy", 1500), ("1500.00", "jpy", 1500), ("0", "jpy", 0),
])
def test_a_typed_amount_becomes_exact_minor_units_of_its_currency(typed, currency, minor):
    from decimal import Decimal

    from billing.money import major_to_minor

    assert major_to_minor(Decimal(typed), currency) == minor


@pytest.mark.parametrize(("typed", "currency"), [("0.001", "usd"), ("12.345", "eur"), ("0.5", "jpy"),
                                                 ("1500.01", "jpy"), ("NaN", "usd"), ("Infinity", "usd")])
def test_an_amount_finer_than_the_minor_unit_is_refused_never_rounded(typed, currency):
    from decimal import Decimal

    from billing.money import major_to_minor

    with pytest.raises(ValueError):
        major_to_minor(Decimal(typed), currency)


def test_floats_are_not_money():
    from billing.money import major_to_minor, minor_to_major

    with pytest.raises(TypeError):
        major_to_minor(12.34, "usd")
    with pytest.raises(TypeError):
        minor_to_major(12.0, "usd")


def test_minor_units_read_back_with_the_currency_decimals():
    from decimal import Decimal

    from billing.money import minor_to_major

    assert str(minor_to_major(1234, "usd")) == "12.34" and str(minor_to_major(1500, "eur")) == "15.00"
    assert str(minor_to_major(0, "gbp")) == "0.00" and str(minor_to_major(-5, "usd")) == "-0.05"
    assert str(minor_to_major(1500, "jpy")) == "1500" and minor_to_major(1500, "jpy") == Decimal(1500)
    assert str(minor_to_major(10**30 + 1, "usd")) == "1" + "0" * 28 + ".01"  # exact beyond 28 digits


def test_a_three_decimal_currency_follows_its_exponent(monkeypatch):
    # money.py accepts no three-decimal currency yet (KWD, BHD): the pair follows the exponent table
    from decimal import Decimal

    from billing import money

    monkeypatch.setitem(money.MINOR_EXPONENT, "kwd", 3)
    assert money.major_to_minor(Decimal("1.234"), "KWD") == 1234 and str(money.minor_to_major(1234, "kwd")) == "1.234"
    with pytest.raises(ValueError):
        money.major_to_minor(Decimal("1.2345"), "kwd")


@given(st.integers(-10**20, 10**20), st.sampled_from(["usd", "eur", "gbp", "jpy"]))
def test_minor_to_major_and_back_is_the_identity(minor, currency):
    from billing.money import major_to_minor, minor_to_major

    assert major_to_minor(minor_to_major(minor, currency), currency) == minor


@given(st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-10**12, max_value=10**12))
def test_cents_typed_in_dollars_are_a_hundred_times_the_dollars(amount):
    from billing.money import major_to_minor, minor_to_major

    minor = major_to_minor(amount, "usd")
    assert minor == amount * 100 and minor_to_major(minor, "usd") == amount


@pytest.mark.parametrize("amount, micros", [(Decimal("0.02"), 20_000), (Decimal("1.5"), 1_500_000), (3, 3_000_000),
                                            (Decimal("0.000001"), 1), (Decimal("0"), 0)])
def test_a_typed_unit_price_becomes_micro_units_exactly(amount, micros):
    assert major_to_micros(amount) == micros


def test_a_unit_price_finer_than_a_micro_unit_or_a_float_is_refused_not_rounded():
    for amount in (Decimal("0.0000001"), Decimal("NaN"), Decimal("Infinity")):
        with pytest.raises(ValueError):
            major_to_micros(amount)
    for amount in (0.02, True):
        with pytest.raises(TypeError):
            major_to_micros(amount)
