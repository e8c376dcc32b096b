"""The owner API (cars, limits, credentials) and the agent's pairing endpoint. Every owner endpoint is
scoped to the requesting owner's cars: another owner's car id is a 404."""

import ipaddress
from zoneinfo import available_timezones

from django.conf import settings
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status, throttling
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from billing.money import femto_per_minor
from billing.selectors import vehicle_earnings_femto
from fleet import services, tokens, workloads
from fleet.eligibility import next_departure
from fleet.models import HardwareGeneration, OwnerPolicy, Vehicle
from fleet.selectors import policy_rules, vehicle_status, vehicle_usage, vehicles_of
from marketplace.api import ErrorSerializer
from marketplace.core.errors import ValidationFailed
from marketplace.idempotency import idempotent
from marketplace.models import Organisation



class IsOwner(permissions.BasePermission):
    message = "This endpoint is for car owners."

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated and request.user.is_owner)


class PairInputSerializer(serializers.Serializer):
    code = serializers.CharField(max_length=32, help_text="The one-time pairing code from the owner's portal.")


class PairOutputSerializer(serializers.Serializer):
    vehicle_id = serializers.IntegerField()
    token = serializers.CharField(help_text="Device token: send it as `Authorization: Bearer` to /ws/vehicle/. Shown once.")


class WindowSerializer(serializers.Serializer):
    weekday = serializers.IntegerField(min_value=0, max_value=6, help_text="0 is Monday.")
    start = serializers.TimeField(format="%H:%M")
    end = serializers.TimeField(format="%H:%M", help_text="At or before start: runs past midnight.")


class DepartureSerializer(serializers.Serializer):
    weekday = serializers.IntegerField(min_value=0, max_value=6)
    at = serializers.TimeField(format="%H:%M")
    charge_pct = serializers.FloatField(min_value=0, max_value=100)


class OneOffDepartureSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    charge_pct = serializers.FloatField(min_value=0, max_value=100)


class PolicySerializer(serializers.ModelSerializer):
    """The owner's limits. Times are in the policy's ``timezone``."""

    timezone = serializers.ChoiceField(choices=sorted(available_timezones()), required=False)
    windows = WindowSerializer(many=True, required=False)
    departures = DepartureSerializer(many=True, required=False)
    one_off_departures = OneOffDepartureSerializer(many=True, required=False)
    categories = serializers.ListField(child=serializers.ChoiceField(choices=[c for c, _, _ in workloads.categories()]), required=False)
    blocked_organisations = serializers.SlugRelatedField(slug_field="slug", many=True, required=False,
                                                         queryset=Organisation.objects.all())
    battery_floor_pct = serializers.IntegerField(min_value=0, max_value=100, required=False)
    battery_resume_pct = serializers.IntegerField(min_value=0, max_value=100, required=False)
    daily_energy_kwh = serializers.FloatField(min_value=0, allow_null=True, required=False)
    monthly_energy_kwh = serializers.FloatField(min_value=0, allow_null=True, required=False)
    daily_data_mb = serializers.FloatField(min_value=0, allow_null=True, required=False)

    class Meta:
        model = OwnerPolicy
        fields = ["paused", "battery_floor_pct", "battery_resume_pct", "wifi_only", "plugged_in_only", "timezone",
                  "windows", "departures", "one_off_departures", "daily_energy_kwh", "monthly_energy_kwh",
                  "daily_data_mb", "max_temp_c", "categories", "blocked_organisations", "reserve_price_micros",
                  "updated_at"]
        read_only_fields = ["updated_at"]

    def to_internal_value(self, data):
        """Times and datetimes become the JSON strings stored on the policy."""
        values = super().to_internal_value(data)
        for name in ("windows", "departures"):
            if name in values:
                values[name] = [{k: (v.strftime("%H:%M") if hasattr(v, "strftime") else v) for k, v in row.items()}
                                for row in values[name]]
        if "one_off_departures" in values:
            values["one_off_departures"] = [{"at": row["at"].isoformat(), "charge_pct": row["charge_pct"]}
                                            for row in values["one_off_departures"]]
        return values


class VehicleSerializer(serializers.ModelSerializer):
    hardware = serializers.SlugRelatedField(slug_field="code", queryset=HardwareGeneration.objects.filter(
        status=HardwareGeneration.Status.IN_SERVICE))
    status = serializers.SerializerMethodField()
    status_reason = serializers.SerializerMethodField()
    paused = serializers.BooleanField(source="policy.paused", read_only=True)

    class Meta:
        model = Vehicle
        fields = ["id", "name", "hardware", "status", "status_reason", "paused", "connected", "battery_pct",
                  "driving", "plugged_in", "on_wifi", "charging_kw", "temp_c", "last_seen_at", "created_at"]
        read_only_fields = ["connected", "battery_pct", "driving", "plugged_in", "on_wifi", "charging_kw", "temp_c",
                            "last_seen_at", "created_at"]

    def _status(self, obj):
        """(status, reason), computed once per car for both fields."""
        cache = self.context.setdefault("status", {})
        if obj.pk not in cache:
            cache[obj.pk] = vehicle_status(vehicle=obj, now=timezone.now(), working=obj.leases_held.exists())
        return cache[obj.pk]

    def get_status(self, obj) -> str:
        return self._status(obj)[0]

    def get_status_reason(self, obj) -> str:
        return self._status(obj)[1]


class VehicleDetailSerializer(VehicleSerializer):
    usage = serializers.SerializerMethodField()
    units_completed = serializers.SerializerMethodField()
    earnings_minor = serializers.SerializerMethodField()
    next_departure = serializers.SerializerMethodField()
    policy = PolicySerializer(read_only=True)

    class Meta(VehicleSerializer.Meta):
        fields = VehicleSerializer.Meta.fields + ["usage", "units_completed", "earnings_minor", "next_departure", "policy"]

    def get_usage(self, obj) -> dict:
        usage = vehicle_usage(vehicle=obj, tz=obj.policy.timezone, now=timezone.now())
        return {"energy_today_kwh": round(usage.energy_today_kwh, 4), "energy_month_kwh": round(usage.energy_month_kwh, 4),
                "data_today_mb": round(usage.data_today_mb, 3)}

    def get_units_completed(self, obj) -> int:
        return obj.units_completed.count()

    def get_earnings_minor(self, obj) -> int:
        """What this car earned its owner to date, in minor units (rounded down)."""
        return vehicle_earnings_femto(vehicle=obj) // femto_per_minor(settings.CURRENCY)

    def get_next_departure(self, obj) -> dict | None:
        found = next_departure(policy_rules(policy=obj.policy, vehicle=obj), timezone.now())
        return None if found is None else {"at": found[0].isoformat(), "charge_pct": found[1]}


class PairingThrottle(throttling.SimpleRateThrottle):
    """Failed pairing attempts, at most ``DEFAULT_THROTTLE_RATES[scope]`` (read per request, so settings changes
    apply) in a sliding window; while they reach it every attempt is refused, a right code too (429, with
    Retry-After until the oldest failure leaves the window). Only failures count, because only guesses fail: a
    depot, or the simulator, pairs many cars from one address. The counts live in the cache: the process's
    memory in the embedded profile (one process), Redis in the services profile, shared by every process."""

    key = None

    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]

    def allow_request(self, request, view):
        self.key = self.get_cache_key(request, view) if self.rate is not None else None
        if self.key is None:
            return True
        self.now = self.timer()
        self.history = [at for at in self.cache.get(self.key, []) if at > self.now - self.duration]
        if len(self.history) >= self.num_requests:
            return self.throttle_failure()
        return True

    def attempt_failed(self) -> None:
        """Count the attempt this throttle let through, which failed (read again: others may have failed since)."""
        if self.key is not None:
            history = [at for at in self.cache.get(self.key, []) if at > self.now - self.duration]
            self.cache.set(self.key, [self.now, *history][:self.num_requests], self.duration)


class PairingClientThrottle(PairingThrottle):
    """Attempts per client address (REMOTE_ADDR: uvicorn sets it from a trusted proxy's X-Forwarded-For, and
    NUM_PROXIES trusts no header of the client's); an IPv6 client per /64 network, which one host usually holds
    whole, so that it cannot take a new address for each guess."""

    scope = "pairing_client"

    def get_cache_key(self, request, view):
        ident = self.get_ident(request)
        try:
            address = ipaddress.ip_address(ident)
        except ValueError:
            pass
        else:
            if address.version == 6:
                ident = str(ipaddress.ip_network(f"{address}/64", strict=False))
        return self.cache_format % {"scope": self.scope, "ident": ident}


class PairingCodeThrottle(PairingThrottle):
    """Attempts per code prefix (the code's first half, PREFIX characters): whoever saw half a code cannot try
    the other half from many addresses. A body without a string code, or a prefix that no issued code has, is
    left to the client's count."""

    scope = "pairing_code"
    PREFIX = 4

    def get_cache_key(self, request, view):
        data = request.data
        code = data.get("code") if isinstance(data, dict) else None
        if not isinstance(code, str):
            return None
        prefix = tokens.pairing_code_normalise(code)[:self.PREFIX]
        if len(prefix) < self.PREFIX or not set(prefix) <= set(tokens.PAIRING_ALPHABET):
            return None
        return self.cache_format % {"scope": self.scope, "ident": tokens.digest(prefix)[:16]}


class UnitInputsApi(APIView):
    """A car fetches the inputs of a unit it holds when they are too large for its unit.assign (page images):
    ``Authorization: Bearer <device token>``; 401 without a working token, 404 for any unit that is not the car's
    current lease at that epoch (docs/vehicle-protocol.md, "Inputs by URL")."""

    permission_classes = [permissions.AllowAny]
    authentication_classes = []
    throttle_classes = []

    @extend_schema(exclude=True)
    def get(self, request, unit_id: int, epoch: int):
        header = request.headers.get("Authorization", "")
        vehicle = services.device_authenticate(token=header[7:] if header.startswith("Bearer ") else "")
        if vehicle is None:
            return Response({"error": {"code": "not_authenticated", "message": "A device token is required."}},
                            status=status.HTTP_401_UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
        inputs = services.unit_inputs_fetch(vehicle=vehicle, unit_id=unit_id, epoch=epoch)
        if inputs is None:
            return Response({"error": {"code": "not_found", "message": "This car holds no such lease."}},
                            status=status.HTTP_404_NOT_FOUND)
        return Response({"inputs": inputs}, headers={"Cache-Control": "no-store"})


class PairApi(APIView):
    """The car's agent exchanges a one-time pairing code for its device token. Attempts are throttled per client
    address and per code prefix (429 with Retry-After; docs/vehicle-protocol.md)."""

    permission_classes = [permissions.AllowAny]
    authentication_classes = []
    throttle_classes = [PairingClientThrottle, PairingCodeThrottle]

    def get_throttles(self):
        self.throttles = super().get_throttles()  # kept, to count a failed attempt on them
        return self.throttles

    @extend_schema(request=PairInputSerializer, responses={
        201: PairOutputSerializer,
        400: OpenApiResponse(ErrorSerializer, description="Code pairing_invalid: the code is unknown, used or expired "
                                                          "(or invalid: the body is not valid)."),
        429: OpenApiResponse(ErrorSerializer, description="Code throttled: too many attempts from this address or for "
                                                          "this code; wait Retry-After seconds.")})
    def post(self, request):
        data = PairInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            vehicle, token = services.vehicle_pair(code=data.validated_data["code"])
        except ValidationFailed:  # pairing_invalid: a wrong, used or expired code
            for throttle in self.throttles:
                throttle.attempt_failed()
            raise
        return Response({"vehicle_id": vehicle.pk, "token": token}, status=status.HTTP_201_CREATED)


class OwnerApi(APIView):
    permission_classes = [IsOwner]

    def vehicle(self, request, pk) -> Vehicle:
        return get_object_or_404(vehicles_of(owner=request.user), pk=pk)


class VehicleListApi(OwnerApi):
    """The owner's cars; POST adds one and answers with its one-time pairing code."""

    @extend_schema(responses=VehicleSerializer(many=True))
    def get(self, request):
        return Response(VehicleSerializer(vehicles_of(owner=request.user), many=True).data)

    @extend_schema(request=VehicleSerializer, responses={201: VehicleSerializer},
                   examples=[OpenApiExample("add a car", request_only=True, value={"name": "Blue Model Y", "hardware": "HW4"})])
    @idempotent
    def post(self, request):
        data = VehicleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        vehicle, code = services.vehicle_create(owner=request.user, name=data.validated_data["name"],
                                                hardware=data.validated_data["hardware"])
        return Response({**VehicleSerializer(vehicle).data, "pairing_code": code}, status=status.HTTP_201_CREATED)


class VehicleDetailApi(OwnerApi):
    """One car: live status, usage, earnings, limits. DELETE removes it (its history stays)."""

    @extend_schema(responses=VehicleDetailSerializer)
    def get(self, request, pk):
        return Response(VehicleDetailSerializer(self.vehicle(request, pk)).data)

    @extend_schema(request=None, responses={204: None})
    def delete(self, request, pk):
        services.vehicle_remove(vehicle=self.vehicle(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class VehiclePolicyApi(OwnerApi):
    """The car's limits. PATCH changes some, PUT all; they apply within seconds (leases are withdrawn when
    the car may no longer work). Overlapping windows are merged."""

    @extend_schema(responses=PolicySerializer)
    def get(self, request, pk):
        return Response(PolicySerializer(self.vehicle(request, pk).policy).data)

    def _update(self, request, pk, partial: bool):
        vehicle = self.vehicle(request, pk)
        data = PolicySerializer(vehicle.policy, data=request.data, partial=partial)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        blocked = fields.pop("blocked_organisations", None)
        services.policy_update(vehicle=vehicle, blocked_organisations=blocked, **fields)
        return Response(PolicySerializer(OwnerPolicy.objects.get(vehicle=vehicle)).data)

    @extend_schema(request=PolicySerializer, responses=PolicySerializer, examples=[OpenApiExample(
        "night owl", request_only=True, value={"battery_floor_pct": 40, "battery_resume_pct": 45,
                                               "timezone": "Europe/Berlin",
                                               "windows": [{"weekday": 0, "start": "22:00", "end": "06:00"}],
                                               "departures": [{"weekday": 1, "at": "07:30", "charge_pct": 70}]})])
    def patch(self, request, pk):
        return self._update(request, pk, partial=True)

    @extend_schema(request=PolicySerializer, responses=PolicySerializer)
    def put(self, request, pk):
        return self._update(request, pk, partial=False)


class VehiclePauseApi(OwnerApi):
    """Pause (or resume) a car: a paused car's active leases are withdrawn at once."""

    pause = True

    @extend_schema(request=None, responses=VehicleSerializer)
    @idempotent
    def post(self, request, pk):
        services.policy_update(vehicle=self.vehicle(request, pk), paused=self.pause)
        return Response(VehicleSerializer(self.vehicle(request, pk)).data)


class PauseAllApi(OwnerApi):
    """Pause (or resume) every car of the owner."""

    pause = True

    @extend_schema(request=None, responses={200: {"type": "object", "properties": {"vehicles": {"type": "integer"}}}})
    @idempotent
    def post(self, request):
        return Response({"vehicles": services.vehicles_pause_all(owner=request.user, paused=self.pause)})


class PairingCodeApi(OwnerApi):
    """A new one-time pairing code for the car's agent (valid 15 minutes)."""

    @extend_schema(request=None, responses={201: {"type": "object", "properties": {"pairing_code": {"type": "string"}}}})
    def post(self, request, pk):
        code = services.pairing_code_issue(vehicle=self.vehicle(request, pk))
        return Response({"pairing_code": code}, status=status.HTTP_201_CREATED)


class TokenRotateApi(OwnerApi):
    """Replace the car's device token; the old one stops working at once. The new one is shown once."""

    @extend_schema(request=None, responses={201: {"type": "object", "properties": {"token": {"type": "string"}}}})
    def post(self, request, pk):
        return Response({"token": services.vehicle_token_rotate(vehicle=self.vehicle(request, pk))},
                        status=status.HTTP_201_CREATED)


class TokenRevokeApi(OwnerApi):
    """Revoke the car's device token: its connection is closed and its work requeued."""

    @extend_schema(request=None, responses={204: None})
    @idempotent
    def post(self, request, pk):
        services.vehicle_token_revoke(vehicle=self.vehicle(request, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)
