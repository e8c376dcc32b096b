"""Forms of the billing pages. Amounts are typed in the major unit of ``settings.CURRENCY`` (dollars), with
its decimals, and leave the form as integer minor units (``*_minor``, billing.money.major_to_minor); nothing
here talks to Stripe or writes."""

from datetime import date
from decimal import Decimal

from django import forms
from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator

from billing.models import SavedCard
from billing.money import MINOR_EXPONENT, major_to_minor, minor_to_major
from billing.payments import MAX_TOP_UP_MINOR, MIN_TOP_UP_MINOR

CURRENCY = settings.CURRENCY


class CardChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, card: SavedCard) -> str:
        expiry = f", expires {card.exp_month:02d}/{card.exp_year}" if card.exp_month and card.exp_year else ""
        return f"{(card.brand or 'card').title()} ending {card.last4 or '????'}{expiry}"


def _money_field(label: str, *, minimum: Decimal, maximum: Decimal, help_text: str = "") -> forms.DecimalField:
    """An amount of the currency's major unit, labelled with the currency and allowing only its decimals."""
    places = MINOR_EXPONENT[CURRENCY.lower()]
    return forms.DecimalField(label=f"{label} ({CURRENCY.upper()})", max_digits=10, decimal_places=places,
                              min_value=minimum, max_value=maximum, help_text=help_text,
                              widget=forms.NumberInput(attrs={"step": str(minor_to_major(1, CURRENCY)),
                                                              "inputmode": "decimal"}))


MIN_TOP_UP = minor_to_major(MIN_TOP_UP_MINOR, CURRENCY)
MAX_TOP_UP = minor_to_major(MAX_TOP_UP_MINOR, CURRENCY)


class TopUpForm(forms.Form):
    amount = _money_field("Amount", minimum=MIN_TOP_UP, maximum=MAX_TOP_UP,
                          help_text=f"From {MIN_TOP_UP:,} to {MAX_TOP_UP:,}. Your card is charged at once.")
    card = CardChoiceField(queryset=SavedCard.objects.none(), empty_label=None, label="Card")

    def __init__(self, *args, organisation, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["card"].queryset = SavedCard.objects.filter(organisation=organisation).order_by("-created_at", "-pk")

    @property
    def amount_minor(self) -> int:
        return major_to_minor(self.cleaned_data["amount"], CURRENCY)


class AutoTopUpForm(forms.Form):
    enabled = forms.BooleanField(label="Top up automatically", required=False)
    threshold = _money_field("When the balance falls under", minimum=Decimal("0"), maximum=MAX_TOP_UP)
    amount = _money_field("Top up by", minimum=MIN_TOP_UP, maximum=MAX_TOP_UP)
    card = CardChoiceField(queryset=SavedCard.objects.none(), empty_label=None, label="With card")

    def __init__(self, *args, organisation, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["card"].queryset = SavedCard.objects.filter(organisation=organisation).order_by("-created_at", "-pk")

    @property
    def threshold_minor(self) -> int:
        return major_to_minor(self.cleaned_data["threshold"], CURRENCY)

    @property
    def amount_minor(self) -> int:
        return major_to_minor(self.cleaned_data["amount"], CURRENCY)


def luhn_ok(number: str) -> bool:
    total = 0
    for i, digit in enumerate(reversed(number)):
        n = int(digit)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


class CardDetailsForm(forms.Form):
    """Card details for the local Stripe peer only (test cards such as 4242 4242 4242 4242)."""

    number = forms.CharField(label="Card number", max_length=23,
                             widget=forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "off",
                                                           "placeholder": "4242 4242 4242 4242"}))
    exp = forms.CharField(label="Expiry (MM/YY)", max_length=7,
                          widget=forms.TextInput(attrs={"placeholder": "12/31", "autocomplete": "off"}))
    cvc = forms.CharField(label="CVC", max_length=4, min_length=3,
                          widget=forms.TextInput(attrs={"inputmode": "numeric", "autocomplete": "off",
                                                        "placeholder": "123"}))

    def clean_number(self) -> str:
        number = "".join(self.cleaned_data["number"].split()).replace("-", "")
        if not number.isdigit() or not 13 <= len(number) <= 19 or not luhn_ok(number):
            raise forms.ValidationError("Enter a valid card number.")
        return number

    def clean_exp(self) -> tuple[int, int]:
        text = self.cleaned_data["exp"].replace(" ", "")
        month, _, year = text.partition("/")
        if not (month.isdigit() and year.isdigit() and len(year) in (2, 4) and 1 <= int(month) <= 12):
            raise forms.ValidationError("Enter the expiry as MM/YY.")
        month, year = int(month), int(year) + (2000 if len(year) == 2 else 0)
        today = date.today()
        if (year, month) < (today.year, today.month):
            raise forms.ValidationError("This card has expired.")
        return month, year

    def clean_cvc(self) -> str:
        cvc = self.cleaned_data["cvc"].strip()
        if not cvc.isdigit():
            raise forms.ValidationError("Enter the 3 or 4 digits on the back of the card.")
        return cvc


class ElectricityPriceForm(forms.Form):
    """The owner's electricity price for the earnings page's estimate (kept on their account)."""

    price = forms.DecimalField(label=f"Your electricity price ({CURRENCY.upper()} per kWh)",
                               max_digits=6, decimal_places=4,
                               validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("10"))],
                               widget=forms.NumberInput(attrs={"step": "0.0001", "inputmode": "decimal",
                                                               "placeholder": "0.15"}))
