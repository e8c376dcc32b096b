from django import forms

from fleet.models import HardwareGeneration


class HardwareChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj):
        return f"{obj.code} · {obj.name}"


class VehicleForm(forms.Form):
    name = forms.CharField(max_length=100)
    hardware = HardwareChoiceField(queryset=HardwareGeneration.objects.filter(status="in_service"),
                                   to_field_name="code", empty_label=None)
