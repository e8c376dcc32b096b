from django.conf import settings
from django.db import models

from fleet.eligibility import DEFAULT_BATTERY_FLOOR_PCT, DEFAULT_BATTERY_RESUME_PCT
from marketplace.models import PRECISION_CHOICES


class HardwareGeneration(models.Model):
    """A car computer generation. New generations are rows, not code."""

    class Status(models.TextChoices):
        IN_SERVICE = "in_service", "In service"
        IN_DESIGN = "in_design", "In design"

    code = models.CharField(max_length=16, unique=True)
    name = models.CharField(max_length=100)
    watts = models.PositiveIntegerField(help_text="Typical draw under inference load.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.IN_SERVICE)
    notes = models.TextField(blank=True)

    class Meta:
        ordering = ["code"]

    def __str__(self):
        return self.code

    @property
    def precisions(self) -> list[str]:
        return [t.precision for t in self.throughputs.all()]


class HardwareThroughput(models.Model):
    """Nominal peak throughput of a generation at one number format."""

    hardware = models.ForeignKey(HardwareGeneration, on_delete=models.CASCADE, related_name="throughputs")
    precision = models.CharField(max_length=8, choices=PRECISION_CHOICES)
    gops_per_s = models.PositiveBigIntegerField(help_text="Giga-operations per second (1 TOPS = 1000).")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["hardware", "precision"], name="one_throughput_per_precision")]

    def __str__(self):
        return f"{self.hardware.code} {self.precision}: {self.gops_per_s / 1000:g} TOPS"


class Vehicle(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="vehicles")
    name = models.CharField(max_length=100)
    hardware = models.ForeignKey(HardwareGeneration, on_delete=models.PROTECT, related_name="vehicles")
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)

    # Pairing: a one-time code the owner types into the car's agent, exchanged for a device token.
    pairing_code_hash = models.CharField(max_length=64, blank=True)
    pairing_expires_at = models.DateTimeField(null=True, blank=True)
    # Device credential: only the SHA-256 of the token is stored.
    token_prefix = models.CharField(max_length=12, blank=True, db_index=True)
    token_hash = models.CharField(max_length=64, blank=True)
    token_issued_at = models.DateTimeField(null=True, blank=True)
    token_revoked_at = models.DateTimeField(null=True, blank=True)

    # Live state, written by the gateway from the car's telemetry.
    connected = models.BooleanField(default=False)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    battery_pct = models.FloatField(null=True, blank=True)
    driving = models.BooleanField(default=False)
    plugged_in = models.BooleanField(default=False)
    on_wifi = models.BooleanField(default=False)
    charging_kw = models.FloatField(default=0.0)
    temp_c = models.FloatField(null=True, blank=True, help_text="Highest of cabin and battery temperature reported.")
    battery_hold = models.BooleanField(default=False, help_text="Battery fell to the floor; waits for the resume level.")
    battery_kwh = models.FloatField(default=75.0, help_text="Usable battery capacity.")
    agent_version = models.CharField(max_length=32, blank=True)
    runtimes = models.JSONField(default=list, blank=True, help_text="Model runtimes the agent can run.")
    tasks = models.JSONField(default=list, blank=True,
                             help_text="Workloads the agent can run (docs/workloads.md), from its hello.")
    throughput_mops = models.JSONField(
        default=dict, blank=True, help_text="Measured mega-ops per second per precision, reported at hello."
    )
    uplink_kbps = models.PositiveIntegerField(null=True, blank=True, help_text="Uplink the agent reported at hello.")
    ineligible_reason = models.CharField(max_length=32, blank=True)
    channel_name = models.CharField(max_length=200, blank=True, help_text="The gateway connection holding the car.")
    lease_strikes = models.PositiveSmallIntegerField(
        default=0, help_text="Leases that ran out without a result since lease_strike_at's memory began "
                             "(fleet.dispatch.inflight_after_strikes).")
    lease_strike_at = models.DateTimeField(null=True, blank=True, help_text="When a lease of the car last ran out.")
    # Capacity is proven, not declared (docs/vehicle-protocol.md, "Capacity is measured"): the auction offers only
    # cars that asked for work lately (the gateway writes this in its batch), at the rate they delivered (VehicleRate).
    work_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="When the car last sent work.request (written in the gateway's batch).")
    hardware_mismatch = models.BooleanField(
        default=False, help_text="Delivers far below what cars of its hardware class deliver: sold at its measured "
                                 "rate only (fleet.services.vehicles_hardware_check).")
    hardware_mismatch_reason = models.CharField(max_length=300, blank=True)

    # Standing: what the checks of its results have shown (fleet.verification, docs/verification.md).
    results_streak = models.PositiveIntegerField(default=0, help_text="Results accepted since its last wrong one.")
    checks_passed = models.PositiveIntegerField(default=0, help_text="Results a check found right, ever.")
    wrong_results = models.PositiveIntegerField(default=0, help_text="Results a check found wrong, ever.")
    wrong_recent = models.PositiveSmallIntegerField(default=0, help_text="Wrong results in the strike memory.")
    wrong_at = models.DateTimeField(null=True, blank=True, help_text="When a result of the car was last found wrong.")
    suspended_at = models.DateTimeField(null=True, blank=True, help_text="Suspended: gets no work until reinstated.")
    suspension_reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class VehicleRate(models.Model):
    """What a car delivered at one precision: an exponentially weighted sum of the mega-ops of its accepted
    results and of the time it was working on them (the union of its leases' intervals, so that units it held
    at once count their time once). Its rate is ``mops / busy_s`` (fleet.selectors.rate_proven). Written only
    by fleet.services.vehicle_rate_record, in the transaction that accepts a result; a row of its own, not the
    car's, because a completion holds the unit and may not go back to the car's row (docs/concurrency.md)."""

    vehicle = models.ForeignKey(Vehicle, on_delete=models.CASCADE, related_name="rates")
    precision = models.CharField(max_length=8, choices=PRECISION_CHOICES)
    mops = models.FloatField(default=0.0, help_text="Weighted mega-ops of accepted results.")
    busy_s = models.FloatField(default=0.0, help_text="Weighted seconds the car was working on them.")
    busy_until = models.FloatField(default=0.0, help_text="Unix time up to which working time is counted.")
    units = models.PositiveIntegerField(default=0, help_text="Accepted results counted (not weighted).")
    delivered_at = models.DateTimeField(null=True, blank=True, help_text="The last accepted result.")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["vehicle", "precision"], name="one_rate_per_precision")]

    def __str__(self):
        return f"{self.vehicle_id} {self.precision}: {self.mops:.0f} Mops in {self.busy_s:.1f} s"


class OwnerPolicy(models.Model):
    """The owner's hard limits for one car; fleet.eligibility decides from them."""

    vehicle = models.OneToOneField(Vehicle, on_delete=models.CASCADE, related_name="policy")
    paused = models.BooleanField(default=False)
    battery_floor_pct = models.PositiveSmallIntegerField(default=DEFAULT_BATTERY_FLOOR_PCT,
                                                         help_text="Stop work at or below this charge.")
    battery_resume_pct = models.PositiveSmallIntegerField(default=DEFAULT_BATTERY_RESUME_PCT,
                                                          help_text="After stopping, resume only above this charge.")
    wifi_only = models.BooleanField(default=True)
    plugged_in_only = models.BooleanField(default=False)
    timezone = models.CharField(max_length=64, default="UTC", help_text="The owner's time zone (IANA name).")
    windows = models.JSONField(default=list, blank=True, help_text='Availability: [{"weekday": 0-6, "start": "HH:MM", '
                                                                  '"end": "HH:MM"}]; empty means any time.')
    departures = models.JSONField(default=list, blank=True, help_text='Recurring: [{"weekday": 0-6, "at": "HH:MM", '
                                                                     '"charge_pct": 80}].')
    one_off_departures = models.JSONField(default=list, blank=True, help_text='[{"at": ISO 8601, "charge_pct": 80}].')
    daily_energy_kwh = models.FloatField(null=True, blank=True)
    monthly_energy_kwh = models.FloatField(null=True, blank=True)
    daily_data_mb = models.FloatField(null=True, blank=True, help_text="Home network data per day.")
    max_temp_c = models.FloatField(null=True, blank=True, help_text="Cabin or battery temperature limit.")
    categories = models.JSONField(default=list, blank=True,
                                  help_text='Workload categories the car may run, e.g. ["embedding"]; empty means all.')
    blocked_organisations = models.ManyToManyField("marketplace.Organisation", blank=True,
                                                   help_text="Buyers whose work this car never runs.")
    reserve_price_micros = models.PositiveBigIntegerField(
        default=0, help_text="The owner's minimum price per compute unit (10^15 ops), in micro-units."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "owner policies"
        constraints = [models.CheckConstraint(condition=models.Q(battery_resume_pct__gt=models.F("battery_floor_pct")),
                                              name="resume_above_floor")]

    def __str__(self):
        return f"Policy of {self.vehicle}"


class VehicleDailyUsage(models.Model):
    """Network data a car used per day of its owner's calendar (energy comes from the meter records)."""

    vehicle = models.ForeignKey(Vehicle, on_delete=models.CASCADE, related_name="daily_usage")
    day = models.DateField()
    data_bytes = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["vehicle", "day"], name="one_usage_row_per_day")]


class WorkUnit(models.Model):
    """A slice of a job's inputs, leased to one car at a time. ``lease_epoch`` fences results: a result is
    accepted only for the unit's current lease."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        LEASED = "leased", "Leased"
        DONE = "done", "Done"
        CANCELLED = "cancelled", "Cancelled"

    job = models.ForeignKey("marketplace.Job", on_delete=models.CASCADE, related_name="units")
    seq = models.PositiveIntegerField(help_text="Position of the unit in the job; results are assembled in this order.")
    inputs = models.JSONField(help_text='[{"id": ..., "text": ...}, ...] in input order.')
    tokens = models.PositiveIntegerField()
    mops = models.PositiveBigIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    leased_to = models.ForeignKey(Vehicle, null=True, blank=True, on_delete=models.SET_NULL, related_name="leases_held")
    lease_epoch = models.PositiveIntegerField(default=0)
    leased_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    lease_deadline_at = models.DateTimeField(
        null=True, blank=True, help_text="The lease's end whatever the car says: heartbeats extend it up to here.")
    allocation = models.ForeignKey("marketplace.Allocation", null=True, blank=True, on_delete=models.SET_NULL)
    price_micros = models.PositiveBigIntegerField(null=True, blank=True, help_text="Clearing price of the current lease.")
    result = models.JSONField(null=True, blank=True)
    completed_by = models.ForeignKey(Vehicle, null=True, blank=True, on_delete=models.SET_NULL, related_name="units_completed")
    completed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # Verification (fleet.verification). ``reference``: the platform's own result, when it has one (a canary,
    # or a unit it arbitrated). ``verify``: what the unit waits for while queued: a replica by a car of another
    # owner than ``verify_owner`` (whose result waits on its lease), or the platform's arbitration (no car gets it).
    reference = models.JSONField(null=True, blank=True, help_text="The platform's result, computed by the reference runtime.")

    class Verify(models.TextChoices):
        NONE = "", "Nothing"
        REPLICA = "replica", "A second car's result"
        ARBITER = "arbiter", "The platform's reference"

    verify = models.CharField(max_length=8, choices=Verify.choices, default=Verify.NONE, blank=True)
    verify_owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+", help_text="The owner whose car's result waits for a replica.")
    verify_since = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job_id", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["job", "seq"], name="unit_seq_unique"),
            models.CheckConstraint(condition=~models.Q(state="leased") | models.Q(leased_to__isnull=False,
                                                                                  lease_expires_at__isnull=False),
                                   name="leased_unit_has_holder_and_expiry"),
        ]
        indexes = [
            models.Index(fields=["job", "state"]),
            models.Index(fields=["state", "lease_expires_at"]),
            # The dispatcher's pick: a job's queued units in sequence order, read straight off this index.
            models.Index(fields=["job", "seq"], condition=models.Q(state="queued"), name="unit_queued_in_order"),
            models.Index(fields=["leased_to", "state"], name="unit_held_by_car"),
        ]

    def __str__(self):
        return f"Unit {self.job_id}/{self.seq}"


class Lease(models.Model):
    """History of every lease, one row per (unit, epoch): how each ended is the audit trail that no unit was
    lost or paid twice."""

    class Outcome(models.TextChoices):
        ACTIVE = "active", "Active"
        COMPLETED = "completed", "Completed"
        EXPIRED = "expired", "Expired"
        WITHDRAWN = "withdrawn", "Withdrawn"
        RELEASED = "released", "Released by the car"
        CANCELLED = "cancelled", "Job cancelled"

    unit = models.ForeignKey(WorkUnit, on_delete=models.CASCADE, related_name="lease_history")
    vehicle = models.ForeignKey(Vehicle, on_delete=models.CASCADE, related_name="lease_history")
    epoch = models.PositiveIntegerField()
    price_micros = models.PositiveBigIntegerField()
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.ACTIVE)
    reason = models.CharField(max_length=64, blank=True)

    class Verdict(models.TextChoices):
        NONE = "", "No result"
        UNCHECKED = "unchecked", "Accepted unchecked"
        PENDING = "pending", "Waiting for its check"
        AGREED = "agreed", "Agreed with another car's"
        RIGHT = "right", "Agreed with the platform's reference"
        WRONG = "wrong", "Wrong"
        VOIDED = "voided", "Unchecked, voided when its car was caught"

    verdict = models.CharField(max_length=12, choices=Verdict.choices, default=Verdict.NONE, blank=True)
    result = models.JSONField(null=True, blank=True, help_text="The car's result while it waits for its check.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["unit", "epoch"], name="lease_epoch_unique"),
            models.UniqueConstraint(fields=["unit"], condition=models.Q(outcome="active"), name="one_open_lease_per_unit"),
        ]
