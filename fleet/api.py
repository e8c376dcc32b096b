from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet import services
from fleet.models import Vehicle
from fleet.selectors import vehicle_status, vehicles_of


class PairInputSerializer(serializers.Serializer):
    code = serializers.CharField(max_length=32, help_text="The one-time pairing code from the owner's portal.")


class PairOutputSerializer(serializers.Serializer):
    vehicle_id = serializers.IntegerField()
    token = serializers.CharField(help_text="Device token: send it as `Authorization: Bearer` to /ws/vehicle/. Shown once.")


class VehicleSerializer(serializers.ModelSerializer):
    hardware = serializers.CharField(source="hardware.code")
    status = serializers.SerializerMethodField()
    paused = serializers.BooleanField(source="policy.paused")
    battery_floor_pct = serializers.IntegerField(source="policy.battery_floor_pct")
    wifi_only = serializers.BooleanField(source="policy.wifi_only")

    class Meta:
        model = Vehicle
        fields = ["id", "name", "hardware", "status", "connected", "battery_pct", "driving", "plugged_in", "on_wifi",
                  "last_seen_at", "paused", "battery_floor_pct", "wifi_only"]

    def get_status(self, obj) -> str:
        return vehicle_status(vehicle=obj, now=timezone.now(), working=obj.leases_held.exists())[0]


class PairApi(APIView):
    """The car's agent exchanges a one-time pairing code for its device token."""

    permission_classes = [permissions.AllowAny]
    authentication_classes = []

    @extend_schema(request=PairInputSerializer, responses={201: PairOutputSerializer})
    def post(self, request):
        data = PairInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        vehicle, token = services.vehicle_pair(code=data.validated_data["code"])
        return Response({"vehicle_id": vehicle.pk, "token": token}, status=status.HTTP_201_CREATED)



class VehicleListApi(APIView):
    """The signed-in owner's cars."""

    @extend_schema(responses=VehicleSerializer(many=True))
    def get(self, request):
        return Response(VehicleSerializer(vehicles_of(owner=request.user), many=True).data)


class VehiclePauseApi(APIView):
    """Pause (or resume) a car: a paused car's active leases are withdrawn at once."""

    pause = True

    @extend_schema(request=None, responses=VehicleSerializer)
    def post(self, request, pk):
        vehicle = get_object_or_404(vehicles_of(owner=request.user), pk=pk)
        services.policy_update(vehicle=vehicle, paused=self.pause)
        return Response(VehicleSerializer(vehicles_of(owner=request.user).get(pk=pk)).data)
