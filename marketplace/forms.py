from django import forms
from django.utils import timezone

from marketplace.models import AIModel, PRECISION_CHOICES, User


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


class JobForm(forms.Form):
    model = forms.ModelChoiceField(queryset=AIModel.objects.filter(active=True), to_field_name="slug", empty_label=None)
    precision = forms.ChoiceField(choices=PRECISION_CHOICES)
    max_price_micros = forms.IntegerField(label="Maximum price", initial=2_000_000,
                                          help_text="µ$ per PetaOp (10^15 operations): your sealed bid.")
    deadline = forms.DateTimeField(widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                                   help_text="UTC. The job expires then; finished units stay paid.")
    inputs = forms.FileField(help_text='JSON Lines: one {"text": "...", "id": "..."} object per line.')

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["deadline"].initial = (timezone.now() + timezone.timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M")


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, initial="default")
