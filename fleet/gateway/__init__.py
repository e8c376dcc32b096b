"""The vehicle websocket gateway (``/ws/vehicle/``, fleet.routing), one concept a module:

- ``session``: a car's websocket session (DeviceConsumer, VehicleConsumer), which speaks fleet.protocol;
- ``batch``: the process's batch of telemetry and heartbeat writes (LiveBatch, ``live_batch``);
- ``collector``: the pacing of the garbage collector (CollectorPacing, ``collector_pacing``).
"""

from fleet.gateway.batch import LiveBatch, live_batch
from fleet.gateway.collector import CollectorPacing, collector_pacing
from fleet.gateway.session import DeviceConsumer, VehicleConsumer

__all__ = ["CollectorPacing", "DeviceConsumer", "LiveBatch", "VehicleConsumer", "collector_pacing", "live_batch"]
