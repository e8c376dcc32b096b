"""Money rules in one place. Never floats.

- Amounts that move (ledger entries, charges, payouts) are integers in the currency's minor unit (cents).
- Unit prices are integers in micro-units: millionths of the currency's major unit, per *compute unit*.
- The compute unit is 10^15 operations at the job's precision (one peta-op). Work is metered in mega-ops
  (10^6 operations), so the exact charge of ``mops`` mega-ops at ``price_micros`` is
  ``mops * price_micros`` femto-units (10^-15 of the major unit): an exact integer, no rounding.
- Femto amounts become minor units in two ways only: a job pays its exact cost so far rounded up once
  (:func:`femto_to_minor_ceil`); an owner's or the platform's share goes through
  :func:`femto_to_minor_with_carry`, which keeps the sub-cent remainder on the account (its ``carry``) so
  nothing is lost. Ledger posting books whatever rounding leaves over to the platform's rounding account.
- What a person types (a top-up, a budget cap, a grant) is an amount of the major unit; it becomes minor units
  only through :func:`major_to_minor`, exactly or not at all, and is shown back through :func:`minor_to_major`.
"""

from decimal import ROUND_HALF_UP, Decimal

OPS_PER_COMPUTE_UNIT = 10**15
OPS_PER_MOP = 10**6
MICROS_PER_MAJOR = 10**6
FEMTO_PER_MAJOR = 10**15
BPS = 10_000

# ISO 4217 minor-unit exponents of the currencies we accept.
MINOR_EXPONENT = {"usd": 2, "eur": 2, "gbp": 2, "jpy": 0}


def major_to_minor(amount: Decimal | int, currency: str) -> int:
    """An amount of the major unit, as a person types it, in whole minor units: 12.34 dollars are 1234 cents,
    1500 yen are 1500 (the yen has no minor unit). Exact or refused, never rounded: an amount finer than the
    currency's minor unit (0.001 dollars, 0.5 yen), NaN or infinity raises ValueError, a float TypeError.
    Forms allow only the currency's decimals, so there the error never arises."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"an amount of money is a Decimal or an int, not {type(amount).__name__}")
    amount, exponent = Decimal(amount), MINOR_EXPONENT[currency.lower()]
    if not amount.is_finite():
        raise ValueError(f"{amount} is not an amount of money")
    sign, digits, places = amount.as_tuple()  # amount == (-1)**sign * coefficient * 10**places
    coefficient, shift = int("".join(map(str, digits))), places + exponent
    if shift >= 0:
        minor = coefficient * 10**shift
    else:
        minor, finer = divmod(coefficient, 10**-shift)
        if finer:
            raise ValueError(f"{amount} is finer than the minor unit of {currency.upper()} "
                             f"({exponent} decimals at most)")
    return -minor if sign else minor


def major_to_micros(amount: Decimal | int) -> int:
    """A unit price in the major unit, as a person or a client types it (0.02 dollars per million tokens), in
    micro-units (20,000), exactly: an amount finer than a micro-unit, NaN or infinity raises ValueError, a float
    or a bool TypeError."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"a price is a Decimal or an int, not {type(amount).__name__}")
    micros = Decimal(amount) * MICROS_PER_MAJOR
    if not micros.is_finite() or micros != micros.to_integral_value():
        raise ValueError(f"{amount} is finer than a millionth of the currency")
    return int(micros)


def minor_to_major(amount_minor: int, currency: str) -> Decimal:
    """Whole minor units as a Decimal of the major unit with the currency's decimals, exactly: 1234 cents are
    Decimal("12.34"), 1500 cents Decimal("15.00"), 1500 yen Decimal("1500"). The inverse of
    :func:`major_to_minor`."""
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise TypeError(f"minor units are an int, not {type(amount_minor).__name__}")
    sign, digits, _ = Decimal(amount_minor).as_tuple()
    return Decimal((sign, digits, -MINOR_EXPONENT[currency.lower()]))


def femto_per_minor(currency: str) -> int:
    return FEMTO_PER_MAJOR // 10 ** MINOR_EXPONENT[currency.lower()]


def charge_femto(*, mops: int, price_micros: int) -> int:
    """The exact charge for ``mops`` mega-ops at ``price_micros`` per compute unit, in femto-units."""
    if mops < 0 or price_micros < 0:
        raise ValueError("mops and price must be non-negative")
    return mops * price_micros


def split_revenue(*, charge: int, fee_bps: int) -> tuple[int, int]:
    """Split an exact charge into (owner share, platform share); the two always add up to the charge.

    The owner's share is rounded down; the platform keeps what rounding leaves."""
    if not 0 <= fee_bps <= BPS:
        raise ValueError("fee_bps must be between 0 and 10000")
    owner = charge * (BPS - fee_bps) // BPS
    return owner, charge - owner


def femto_to_minor_with_carry(*, femto: int, carry: int, currency: str) -> tuple[int, int]:
    """Add ``femto`` to an account's sub-minor ``carry``; return (whole minor units, new carry).

    Works for negative amounts too (floor division): the carry always stays in [0, one minor unit)."""
    minor, new_carry = divmod(carry + femto, femto_per_minor(currency))
    return minor, new_carry


def femto_to_minor_ceil(*, femto: int, currency: str) -> int:
    """An exact femto amount in whole minor units, rounded up: for estimates and caps shown to a buyer."""
    return -(-femto // femto_per_minor(currency))


def mops_for_tokens(*, tokens: int, ops_per_token: int) -> int:
    """The work of ``tokens`` tokens of a model, in mega-ops, rounded up: how a work unit is sized."""
    return -(-tokens * ops_per_token // OPS_PER_MOP)


def price_per_units_micros(*, price_micros: int, ops_per_unit: int, per: int) -> int:
    """What a price per compute unit means to a buyer of a model: micro-units per ``per`` of its workload's cost
    units (a million tokens, a thousand pages: fleet.workloads.base.PriceUnit), rounded down."""
    return price_micros * ops_per_unit * per // OPS_PER_COMPUTE_UNIT


def price_micros_for_per_units(*, per_units_micros: int, ops_per_unit: int, per: int) -> int:
    """The inverse of :func:`price_per_units_micros`: a price per compute unit from a price per ``per`` cost
    units of a model, rounded down, so that a bid never exceeds what the buyer typed."""
    return per_units_micros * OPS_PER_COMPUTE_UNIT // (ops_per_unit * per)


def format_femto_as_minor(femto: int, currency: str) -> str:
    """An exact femto amount shown in minor units with two decimals (hundredths of a cent), rounded down.
    Display only: the ledger books whole minor units."""
    hundredths = femto // (femto_per_minor(currency) // 100)
    return f"{hundredths // 100:,}.{hundredths % 100:02d}"


CURRENCY_SYMBOL = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}


def format_major(value: Decimal, currency: str, places: int | None = None, rounding: str = ROUND_HALF_UP) -> str:
    """An amount of the major unit as people read it, with the currency's decimals (or ``places``):
    ``format_major(Decimal("1234.5"), "usd") == "$1,234.50"``. Display only."""
    exponent = MINOR_EXPONENT[currency.lower()] if places is None else places
    value = value.quantize(Decimal(1).scaleb(-exponent), rounding=rounding)
    symbol = CURRENCY_SYMBOL.get(currency.lower(), currency.upper() + " ")
    return f"-{symbol}{-value:,}" if value < 0 else f"{symbol}{value:,}"


def currency_symbol(currency: str) -> str:
    """How prices per unit name the currency (``$/kWh``): its symbol, else its ISO code."""
    return CURRENCY_SYMBOL.get(currency.lower(), currency.upper())


def format_minor(minor: int, currency: str) -> str:
    """Whole minor units as people read them: ``format_minor(123456, "usd") == "$1,234.56"``."""
    return format_major(minor_to_major(int(minor), currency), currency)
