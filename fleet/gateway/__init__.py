"""The vehicle websocket gateway (``/ws/vehicle/``, fleet.routing), one concept a module:

- ``session``: a car's websocket session (DeviceConsumer, VehicleConsumer), which speaks fleet.protocol;
- ``batch``: the process's batch of telemetry and heartbeat writes (LiveBatch, ``live_batch``);
- ``collector``: the pacing of the garbage collector (CollectorPacing, ``collector_pacing``);
- ``liveness``: the closing of connections without a hello, and of silent cars (Liveness, ``liveness``).
"""

from fleet.gateway.batch import LiveBatch, live_batch
from fleet.gateway.collector import CollectorPacing, collector_pacing
from fleet.gateway.liveness import Liveness, liveness
from fleet.gateway.session import DeviceConsumer, VehicleConsumer

__all__ = ["CollectorPacing", "DeviceConsumer", "LiveBatch", "Liveness", "VehicleConsumer", "collector_pacing",
           "live_batch", "liveness"]
