from datetime import datetime, time
from zoneinfo import ZoneInfo, available_timezones

from django import forms
from django.utils import timezone

from fleet import workloads
from fleet.models import HardwareGeneration, OwnerPolicy, Vehicle
from fleet.portal import WEEKDAYS
from marketplace.models import Organisation

#: Empty rows the limits form's tables show after the saved ones (at least), and at least this many rows in
#: all; the "Add a row" button adds more in the browser, and a save without script shows a fresh empty row.
WINDOW_ROWS, DEPARTURE_ROWS, ONE_OFF_ROWS = 3, 2, 1
TIMEZONES = sorted(available_timezones())

PERCENT_ERRORS = {"min_value": "Enter a percentage from 0 to 100.", "max_value": "Enter a percentage from 0 to 100.",
                  "invalid": "Enter a whole percentage from 0 to 100."}
TIME_ERRORS = {"invalid": "Enter a valid time, such as 07:30."}


class HardwareChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj):
        return f"{obj.code} · {obj.name}"


class VehicleForm(forms.Form):
    name = forms.CharField(max_length=100)
    hardware = HardwareChoiceField(queryset=HardwareGeneration.objects.filter(status="in_service"),
                                   to_field_name="code", empty_label=None)


def _time_input():
    # A plain text box: the browser's time picker follows the machine's 12/24-hour setting, the site 24 hours.
    return forms.TimeInput(attrs={"placeholder": "HH:MM", "inputmode": "numeric", "maxlength": 5, "autocomplete": "off",
                                  "class": "time"}, format="%H:%M")


def _plain(value):
    """A float that is a whole number shown without its ".0"."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _percent(**kwargs) -> forms.IntegerField:
    return forms.IntegerField(min_value=0, max_value=100, error_messages=PERCENT_ERRORS,
                              widget=forms.NumberInput(attrs={"min": 0, "max": 100, "step": 1}), **kwargs)


class RowForm(forms.Form):
    """One row of a weekly table: blank rows are ignored, half-filled rows are refused."""

    incomplete = "Fill in every column of this row, or clear it."

    def clean(self):
        data = super().clean()
        filled = [name for name in self.fields if data.get(name) not in (None, "")]
        if filled and len(filled) < len(self.fields) and not self.errors:
            raise forms.ValidationError(self.incomplete)
        return data

    @property
    def is_blank(self) -> bool:
        return all(self.cleaned_data.get(name) in (None, "") for name in self.fields)


class WindowForm(RowForm):
    weekday = forms.TypedChoiceField(label="Day", choices=[("", "—")] + WEEKDAYS, coerce=int, required=False,
                                     empty_value=None)
    start = forms.TimeField(label="From", required=False, widget=_time_input(), error_messages=TIME_ERRORS)
    end = forms.TimeField(label="To", required=False, widget=_time_input(), error_messages=TIME_ERRORS)

    incomplete = "Give the day, the start and the end of this window, or clear the row."

    def value(self) -> dict:
        data = self.cleaned_data
        return {"weekday": data["weekday"], "start": data["start"].strftime("%H:%M"), "end": data["end"].strftime("%H:%M")}


class DepartureForm(RowForm):
    weekday = forms.TypedChoiceField(label="Day", choices=[("", "—")] + WEEKDAYS, coerce=int, required=False,
                                     empty_value=None)
    at = forms.TimeField(label="Leave at", required=False, widget=_time_input(), error_messages=TIME_ERRORS)
    charge_pct = _percent(label="Charge needed (%)", required=False)

    incomplete = "Give the day, the time and the charge you need, or clear the row."

    def value(self) -> dict:
        data = self.cleaned_data
        return {"weekday": data["weekday"], "at": data["at"].strftime("%H:%M"), "charge_pct": data["charge_pct"]}


class OneOffDepartureForm(RowForm):
    at = forms.DateTimeField(label="Date and time", required=False, input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"],
                             widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
                             error_messages={"invalid": "Enter a valid date and time."})
    charge_pct = _percent(label="Charge needed (%)", required=False)

    incomplete = "Give the date, the time and the charge you need, or clear the row."


WindowFormSet = forms.formset_factory(WindowForm, extra=0)
DepartureFormSet = forms.formset_factory(DepartureForm, extra=0)
OneOffFormSet = forms.formset_factory(OneOffDepartureForm, extra=0)


def _positive(value, what: str):
    if value is not None and value <= 0:
        raise forms.ValidationError(f"Enter a positive {what}, or leave it empty for no limit.")
    return value


class PolicyForm(forms.Form):
    """The owner's limits for one car, in plain words. Times are in the chosen time zone."""

    # Battery and departures
    battery_floor_pct = _percent(label="Stop working at", help_text=(
        "When the battery falls to this charge, the car stops computing at once and its work goes to other cars."))
    battery_resume_pct = _percent(label="Start again only above", help_text=(
        "After a stop for the battery, the car waits until its charge is above this level, so that it does not "
        "switch on and off around one level. It must be above the stop level."))
    # When
    timezone = forms.ChoiceField(label="Your time zone", choices=[(tz, tz) for tz in TIMEZONES], help_text=(
        "Available hours and departures are in this time zone; daylight-saving changes are followed."))
    # Budgets
    daily_energy_kwh = forms.FloatField(label="Energy per day", required=False, help_text=(
        "The most the car's computer may draw from the battery in one of your days. Empty: no daily limit."))
    monthly_energy_kwh = forms.FloatField(label="Energy per month", required=False, help_text=(
        "The same for a calendar month. Empty: no monthly limit."))
    daily_data_mb = forms.FloatField(label="Home network data per day", required=False, help_text=(
        "The most data the car may exchange for work in a day, for capped home internet. Empty: no limit."))
    # Network and power
    wifi_only = forms.BooleanField(label="Only on WiFi", required=False, help_text=(
        "Never use the car's mobile data for work."))
    plugged_in_only = forms.BooleanField(label="Only while plugged in", required=False, help_text=(
        "Work only while the charging cable is connected."))
    max_temp_c = forms.FloatField(label="Temperature limit", required=False, min_value=-40, max_value=90,
                                  error_messages={"min_value": "Enter a temperature from -40 to 90 °C.",
                                                  "max_value": "Enter a temperature from -40 to 90 °C."},
                                  help_text=("Stop when the cabin or the battery is warmer than this. With a limit, a "
                                             "car that reports no temperature takes no work. Empty: no limit."))
    # What it may run
    categories_mode = forms.ChoiceField(label="Kinds of work", widget=forms.RadioSelect, initial="all", choices=[
        ("all", "Any kind of work, including kinds added later"), ("only", "Only the kinds ticked below")])
    categories = forms.MultipleChoiceField(
        label="Allowed kinds", required=False, widget=forms.CheckboxSelectMultiple,
        choices=[(code, f"{name}: {what}") for code, name, what in workloads.categories()])
    blocked_organisations = forms.ModelMultipleChoiceField(
        label="Never work for these buyers", required=False, widget=forms.CheckboxSelectMultiple,
        queryset=Organisation.objects.order_by("name"),
        help_text="Work of a ticked organisation is never given to this car. Tick none to work for every buyer.")
    # Price
    reserve_price_micros = forms.IntegerField(label="Minimum price", min_value=0, error_messages={
        "min_value": "Enter 0 or a positive price.", "invalid": "Enter a whole number of µ$."})

    GROUPS = [
        ("battery", "Battery and departures",
         "The car keeps enough charge for you: it stops at your level, and before each departure it keeps the "
         "charge you need then.", ["battery_floor_pct", "battery_resume_pct"]),
        ("when", "When", "The hours the car may work. With no rows, it may work at any time.", ["timezone"]),
        ("budgets", "Budgets", "Caps on what the car spends on work.",
         ["daily_energy_kwh", "monthly_energy_kwh", "daily_data_mb"]),
        ("network", "Network and power", "Conditions the car must meet to work.",
         ["wifi_only", "plugged_in_only", "max_temp_c"]),
        ("consent", "What it may run", "Your consent: which work the car takes, and for whom.",
         ["categories_mode", "categories", "blocked_organisations"]),
        ("price", "Price", "Your car takes work only at this price or above.", ["reserve_price_micros"]),
    ]
    UNITS = {"battery_floor_pct": "%", "battery_resume_pct": "%", "daily_energy_kwh": "kWh",
             "monthly_energy_kwh": "kWh", "daily_data_mb": "MB", "max_temp_c": "°C", "reserve_price_micros": "µ$ / PetaOp"}

    def __init__(self, *args, vehicle: Vehicle, prices: dict[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vehicle = vehicle
        kwh_per_hour = vehicle.hardware.watts / 1000
        self.fields["daily_energy_kwh"].help_text += (
            f" This car's computer draws about {kwh_per_hour:g} kWh per hour of work.")
        price_help = ("The least a buyer must pay per PetaOp (10<sup>15</sup> operations), in millionths of a dollar "
                      "(µ$). 0: any price the market clears.")
        if prices:
            price_help += " Latest market prices: " + ", ".join(
                f"{market.upper()} {price:,} µ$" for market, price in prices.items()) + "."
        self.fields["reserve_price_micros"].help_text = price_help
        for name, unit in self.UNITS.items():
            self.fields[name].unit = unit
            self.fields[name].widget.attrs.setdefault("inputmode", "decimal")

    @classmethod
    def initial_for(cls, policy: OwnerPolicy) -> dict:
        return {
            "battery_floor_pct": policy.battery_floor_pct, "battery_resume_pct": policy.battery_resume_pct,
            "timezone": policy.timezone, "daily_energy_kwh": _plain(policy.daily_energy_kwh),
            "monthly_energy_kwh": _plain(policy.monthly_energy_kwh), "daily_data_mb": _plain(policy.daily_data_mb),
            "wifi_only": policy.wifi_only, "plugged_in_only": policy.plugged_in_only,
            "max_temp_c": _plain(policy.max_temp_c),
            "categories_mode": "only" if policy.categories else "all", "categories": list(policy.categories),
            "blocked_organisations": list(policy.blocked_organisations.all()),
            "reserve_price_micros": policy.reserve_price_micros,
        }

    def clean_daily_energy_kwh(self):
        return _positive(self.cleaned_data["daily_energy_kwh"], "number of kWh")

    def clean_monthly_energy_kwh(self):
        return _positive(self.cleaned_data["monthly_energy_kwh"], "number of kWh")

    def clean_daily_data_mb(self):
        return _positive(self.cleaned_data["daily_data_mb"], "number of MB")

    def clean(self):
        data = super().clean()
        if data.get("categories_mode") == "only" and not data.get("categories"):
            self.add_error("categories", "Tick at least one kind of work, or choose “Any kind of work”.")
        return data

    def groups(self):
        for key, title, intro, names in self.GROUPS:
            yield {"key": key, "title": title, "intro": intro, "fields": [self[name] for name in names]}


class LimitsForm:
    """The policy form with its three tables (availability windows, weekly and one-off departures)."""

    def __init__(self, data=None, *, vehicle: Vehicle, prices: dict[str, int] | None = None):
        policy = vehicle.policy
        self.vehicle, self.policy = vehicle, policy
        tz = ZoneInfo(policy.timezone)
        now = timezone.now()
        windows = [{"weekday": w["weekday"], "start": time.fromisoformat(w["start"]), "end": time.fromisoformat(w["end"])}
                   for w in policy.windows]
        departures = [{"weekday": d["weekday"], "at": time.fromisoformat(d["at"]), "charge_pct": round(d["charge_pct"])}
                      for d in policy.departures]
        one_offs = [{"at": at.astimezone(tz).replace(tzinfo=None), "charge_pct": round(d["charge_pct"])}
                    for d in policy.one_off_departures if (at := datetime.fromisoformat(d["at"])) > now]
        self.policy_form = PolicyForm(data, vehicle=vehicle, prices=prices, initial=PolicyForm.initial_for(policy))
        self.windows = self._formset(WindowFormSet, data, "windows", windows, WINDOW_ROWS)
        self.departures = self._formset(DepartureFormSet, data, "departures", departures, DEPARTURE_ROWS)
        self.one_offs = self._formset(OneOffFormSet, data, "one_offs", one_offs, ONE_OFF_ROWS)
        self.service_error: str | None = None

    @staticmethod
    def _formset(cls, data, prefix: str, rows: list[dict], blank: int):
        if data is not None:
            return cls(data, prefix=prefix)
        return cls(prefix=prefix, initial=rows + [{}] * max(blank - len(rows), 1))

    @property
    def tables(self):
        return [self.windows, self.departures, self.one_offs]

    def is_valid(self) -> bool:
        valid = self.policy_form.is_valid()
        valid = all([fs.is_valid() for fs in self.tables]) and valid
        if valid:
            valid = self._check_one_offs()
        return valid

    def _check_one_offs(self) -> bool:
        tz, now, ok = ZoneInfo(self.policy_form.cleaned_data["timezone"]), timezone.now(), True
        for form in self.one_offs:
            if not form.is_blank and form.cleaned_data["at"].replace(tzinfo=tz) <= now:
                form.add_error("at", "This time has passed: give a future date and time.")
                ok = False
        return ok

    def window_values(self) -> list[dict]:
        return [f.value() for f in self.windows if not f.is_blank]

    def changes(self) -> tuple[dict, list[Organisation]]:
        """(policy fields, blocked organisations) for fleet.services.policy_update."""
        data = self.policy_form.cleaned_data
        tz = ZoneInfo(data["timezone"])
        fields = {name: data[name] for name in (
            "battery_floor_pct", "battery_resume_pct", "timezone", "daily_energy_kwh", "monthly_energy_kwh",
            "daily_data_mb", "wifi_only", "plugged_in_only", "max_temp_c", "reserve_price_micros")}
        fields["categories"] = list(data["categories"]) if data["categories_mode"] == "only" else []
        fields["windows"] = self.window_values()
        fields["departures"] = [f.value() for f in self.departures if not f.is_blank]
        fields["one_off_departures"] = sorted(
            ({"at": f.cleaned_data["at"].replace(tzinfo=tz).isoformat(), "charge_pct": f.cleaned_data["charge_pct"]}
             for f in self.one_offs if not f.is_blank), key=lambda d: d["at"])
        return fields, list(data["blocked_organisations"])

    def add_service_errors(self, exc) -> None:
        """Show a refusal of fleet.services.policy_update next to its fields and at the top of the form."""
        self.service_error = exc.message
        for name, problems in exc.extra.get("fields", {}).items():
            for problem in problems if isinstance(problems, list) else [problems]:
                self.policy_form.add_error(name if name in self.policy_form.fields else None, problem)

    @property
    def has_errors(self) -> bool:
        return bool(self.service_error or self.policy_form.errors or any(
            fs.non_form_errors() or any(f.errors for f in fs) for fs in self.tables if fs.is_bound))
