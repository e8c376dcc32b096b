"""Cars that have proven their capacity: what they delivered is recorded through the service that the
completion flow calls (fleet.services.vehicle_rate_record), so that a test can say "this car delivers 20,000
Mops/s in INT8" the way the auction now learns it (docs/vehicle-protocol.md, "Capacity is measured")."""


from django.utils import timezone

from fleet import services


def deliver(vehicle, *, precision: str = "int8", mops_per_s: int, seconds: float = 10.0, now=None) -> None:
    """Record that ``vehicle`` delivered ``mops_per_s`` at ``precision`` for ``seconds`` of work, ending ``now``."""
    now = now or timezone.now()
    services.vehicle_rate_record(vehicle_id=vehicle.pk, precision=precision, mops=round(mops_per_s * seconds),
                                 duration_ms=round(seconds * 1000), now=now)
