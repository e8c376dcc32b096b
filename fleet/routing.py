from django.urls import path

from fleet.consumers import VehicleConsumer

websocket_urlpatterns = [path("ws/vehicle/", VehicleConsumer.as_asgi())]
