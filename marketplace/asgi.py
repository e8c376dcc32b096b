import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs the app registry)
from django.urls import re_path  # noqa: E402

from fleet.routing import websocket_urlpatterns  # noqa: E402


async def websocket_not_found(scope, receive, send):
    """A websocket to a path nothing serves is refused before it is accepted (HTTP 403 on the handshake, as a
    wrong token is). Without this channels' URLRouter raised, and the server answered 500 with a traceback in its
    log. (A 404 through the ASGI ``websocket.http.response`` extension makes uvicorn log an error for every
    such probe: it takes the handshake as never completed.)"""
    if (await receive())["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


application = ProtocolTypeRouter({
    "http": django_asgi_app,
    "websocket": URLRouter([*websocket_urlpatterns, re_path(r"", websocket_not_found)]),
})
