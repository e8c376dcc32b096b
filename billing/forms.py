"""Forms of the billing pages. Amounts are typed in the currency's major unit (dollars) and leave the form as
integer minor units (``*_minor``); nothing here talks to Stripe or writes."""

from datetime import date
from decimal import Decimal

from django import forms
from django.core.validators import MaxValueValidator, MinValueValidator

from billing.models import SavedCard
from billing.payments import MAX_TOP_UP_MINOR, MIN_TOP_UP_MINOR


def _to_minor(value: Decimal) -> int:
    return int((value * 100).to_integral_value())


class CardChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, card: SavedCard) -> str:
        expiry = f", expires {card.exp_month:02d}/{card.exp_year}" if card.exp_month and card.exp_year else ""
        return f"{(card.brand or 'card').title()} ending {card.last4 or '????'}{expiry}"


def _money_field(label: str, *, minimum: Decimal, maximum: Decimal, help_text: str = "") -> forms.DecimalField:
    return forms.DecimalField(label=label, max_digits=10, decimal_places=2, min_value=minimum, max_value=maximum,
                              help_text=help_text, widget=forms.NumberInput(attrs={"step": "0.01", "inputmode": "decimal"}))


MIN_DOLLARS = Decimal(MIN_TOP_UP_MINOR) / 100
MAX_DOLLARS = Decimal(MAX_TOP_UP_MINOR) / 100


class TopUpForm(forms.Form):
    amount = _money_field("Amount (USD)", minimum=MIN_DOLLARS, maximum=MAX_DOLLARS,
                          help_text=f"From {MIN_DOLLARS:,.2f} to {MAX_DOLLARS:,.2f}. Your card is charged at once.")
    card = CardChoiceField(queryset=SavedCard.objects.none(), empty_label=None, label="Card")

    def __init__(self, *args, organisation, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["card"].queryset = SavedCard.objects.filter(organisation=organisation).order_by("-created_at", "-pk")

    @property
    def amount_minor(self) -> int:
        return _to_minor(self.cleaned_data["amount"])


class AutoTopUpForm(forms.Form):
    enabled = forms.BooleanField(label="Top up automatically", required=False)
    threshold = _money_field("When the balance falls under (USD)", minimum=Decimal("0"), maximum=MAX_DOLLARS)
    amount = _money_field("Top up by (USD)", minimum=MIN_DOLLARS, maximum=MAX_DOLLARS)
    card = CardChoiceField(queryset=SavedCard.objects.none(), empty_label=None, label="With card")

    def __init__(self, *args, organisation, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["card"].queryset = SavedCard.objects.filter(organisation=organisation).order_by("-created_at", "-pk")

    @property
    def threshold_minor(self) -> int:
        return _to_minor(self.cleaned_data["threshold"])

    @property
    def amount_minor(self) -> int:
        return _to_minor(self.cleaned_data["amount"])


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

    price = forms.DecimalField(label="Your electricity price (USD per kWh)", max_digits=6, decimal_places=4,
                               validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("10"))],
                               widget=forms.NumberInput(attrs={"step": "0.0001", "inputmode": "decimal",
                                                               "placeholder": "0.15"}))
