from django import forms

from fleet.models import HardwareGeneration


class VehicleForm(forms.Form):
    name = forms.CharField(max_length=100)
    hardware = forms.ModelChoiceField(queryset=HardwareGeneration.objects.filter(status="in_service"),
                                      to_field_name="code", empty_label=None)
