from django.urls import path

from fleet.gateway import VehicleConsumer

websocket_urlpatterns = [path("ws/vehicle/", VehicleConsumer.as_asgi())]
