from decimal import Decimal

from django import forms
from django.conf import settings
from django.utils import timezone

from billing.money import MINOR_EXPONENT, major_to_micros, major_to_minor, minor_to_major
from fleet import workloads
from marketplace.models import PRECISION_CHOICES, AIModel, User



class SignupForm(forms.Form):
    """Extra fields of allauth's sign-up: who is signing up."""

    role = forms.ChoiceField(choices=[(User.Role.OWNER, "I own a car and want to rent out its computer"),
                                      (User.Role.BUYER, "I buy inference capacity for my organisation")],
                             widget=forms.RadioSelect, initial=User.Role.OWNER)
    organisation = forms.CharField(max_length=200, required=False, help_text="Buyers: your organisation's name.")

    def clean(self):
        data = super().clean()
        if data.get("role") == User.Role.BUYER and not data.get("organisation", "").strip():
            self.add_error("organisation", "Buyers sign up for an organisation: give its name.")
        return data

    def signup(self, request, user):
        from marketplace.services import user_role_set

        user_role_set(user=user, role=self.cleaned_data["role"], organisation_name=self.cleaned_data.get("organisation"))


class BudgetField(forms.DecimalField):
    """An optional budget cap in the major unit of ``settings.CURRENCY`` (dollars), cleaned to minor units
    (cents): ``None`` when left empty."""

    def __init__(self, **kwargs):
        self.currency = settings.CURRENCY
        kwargs.setdefault("label", "Budget cap")
        kwargs.setdefault("help_text", f"Optional, in {self.currency.upper()}: the most the job may spend. "
                                       "It stops short of the cap.")
        super().__init__(required=False, min_value=minor_to_major(1, self.currency), max_digits=14,
                         decimal_places=MINOR_EXPONENT[self.currency.lower()], **kwargs)

    def clean(self, value):
        amount = super().clean(value)
        return None if amount is None else major_to_minor(amount, self.currency)


def bid_micros(*, ai_model: AIModel, per_unit: Decimal) -> int:
    """A bid typed in dollars per price unit of ``ai_model`` (a million tokens, a thousand pages), as µ$ per
    compute unit (rounded down)."""
    return ai_model.price_from_buyer(major_to_micros(per_unit))


def _price_units() -> str:
    """What the bid field is per, by price unit: "per million tokens (Embeddings, Classification) or ..."."""
    by_unit: dict[str, list[str]] = {}
    for workload in workloads.WORKLOADS.values():
        by_unit.setdefault(workload.price_unit.label, []).append(workload.title)
    return " or ".join(f"{label} ({', '.join(titles)})" for label, titles in by_unit.items())


class JobForm(forms.Form):
    """A new job as a buyer thinks of it: a model, a maximum price per price unit of that model, a deadline
    and the documents. The bid is stored per compute unit (what the auction clears), rounded down."""

    model = forms.ModelChoiceField(queryset=AIModel.objects.filter(active=True), to_field_name="slug", empty_label=None)
    precision = forms.ChoiceField(choices=PRECISION_CHOICES,
                                  help_text="Number format the cars compute in: INT8 is cheapest, FP32 the most exact.")
    max_price_per_unit = forms.DecimalField(
        label="Maximum price", min_value=Decimal("0.000001"), max_digits=12, decimal_places=6,
        help_text=f"In {settings.CURRENCY.upper()} {_price_units()}: your sealed bid. Every round's single clearing "
                  "price is at most this, often less.")
    deadline = forms.DateTimeField(widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                                   help_text="UTC. The job expires then; finished units stay paid.")
    budget_cap = BudgetField()
    labels = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 4, "placeholder": "invoice: a bill asking for payment\n"
                                                                               "letter\nreceipt"}),
        label="Labels (classification models)",
        help_text="One label per line, optionally followed by a colon and a description of what belongs in it. "
                  "Each document gets one of them. (A trained linear head: through the API.)")
    inputs = forms.FileField(help_text="JSON Lines: one document per line, as each model's card shows. Large files "
                                       "are streamed; a bad line is reported by its number and nothing is created.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["deadline"].initial = (timezone.now() + timezone.timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M")

    def clean_labels(self) -> list[dict]:
        labels = []
        for line in self.cleaned_data["labels"].splitlines():
            name, _, description = line.partition(":")
            if name.strip():
                labels.append({"name": name.strip(), **({"description": description.strip()} if description.strip()
                                                         else {})})
        return labels

    def clean(self):
        data = super().clean()
        ai_model, precision, per_unit = data.get("model"), data.get("precision"), data.get("max_price_per_unit")
        if ai_model and precision and precision not in ai_model.precisions:
            self.add_error("precision", f"{ai_model.name} runs at {', '.join(p.upper() for p in ai_model.precisions)}.")
        if ai_model and per_unit is not None:
            data["max_price_micros"] = bid_micros(ai_model=ai_model, per_unit=per_unit)
            if data["max_price_micros"] <= 0:
                self.add_error("max_price_per_unit", "This price is below one micro-dollar per PetaOp: raise it.")
        labels = data.get("labels") or []
        if ai_model and ai_model.task == "classification":
            data["params"] = {"labels": labels}  # checked by the workload (fleet.workloads.classification)
        elif ai_model and labels:
            self.add_error("labels", f"{ai_model.name} takes no labels: leave this empty, or pick a classification "
                                     "model.")
        return data


class JobTermsForm(forms.Form):
    """Change an open job's bid (per price unit of its model) and budget cap."""

    max_price_per_unit = forms.DecimalField(label="Maximum price", min_value=Decimal("0.000001"),
                                            max_digits=12, decimal_places=6,
                                            help_text=f"In {settings.CURRENCY.upper()}.")
    budget_cap = BudgetField(help_text=f"In {settings.CURRENCY.upper()}; empty: no cap.")

    def __init__(self, *args, ai_model: AIModel, **kwargs):
        super().__init__(*args, **kwargs)
        self.ai_model = ai_model
        self.fields["max_price_per_unit"].help_text = f"In {settings.CURRENCY.upper()} {ai_model.price_unit.label}."

    def clean(self):
        data = super().clean()
        if data.get("max_price_per_unit") is not None:
            data["max_price_micros"] = bid_micros(ai_model=self.ai_model, per_unit=data["max_price_per_unit"])
            if data["max_price_micros"] <= 0:
                self.add_error("max_price_per_unit", "This price is below one micro-dollar per PetaOp: raise it.")
        return data


class EstimateForm(forms.Form):
    """What the new-job page knows before the upload: the model, the bid and the file's size in documents and
    characters (counted in the browser)."""

    model = forms.ModelChoiceField(queryset=AIModel.objects.filter(active=True), to_field_name="slug")
    precision = forms.ChoiceField(choices=PRECISION_CHOICES)
    max_price_per_unit = forms.DecimalField(min_value=Decimal("0.000001"), max_digits=12, decimal_places=6)
    docs = forms.IntegerField(min_value=1)
    chars = forms.IntegerField(min_value=0)
    budget_cap = BudgetField()

    def cost_units(self) -> int:
        """The job's estimated cost units (tokens, pages) by its model's workload."""
        data = self.cleaned_data
        return workloads.get(data["model"].task).estimate_costs(workloads.ModelInfo.of(data["model"]),
                                                                docs=data["docs"], chars=data["chars"])


class MemberAddForm(forms.Form):
    email = forms.EmailField(label="Email address", help_text="They get an email with a link to set their password.")


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, initial="default")


class ApiKeyDefaultBidForm(forms.Form):
    default_bid = forms.DecimalField(
        label="Default batch bid", required=False, min_value=Decimal("0.000001"), max_digits=18, decimal_places=6,
        help_text="$ per million tokens for OpenAI-compatible batches made with this key that name no bid; empty: "
                  "the suggested price, capped by the balance.")

    def per_million_tokens_micros(self) -> int | None:
        value = self.cleaned_data["default_bid"]
        return None if value is None else major_to_micros(value)
