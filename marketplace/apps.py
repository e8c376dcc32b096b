from django.apps import AppConfig
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished
from django.db import connections
from django.db.models.signals import post_migrate


def _sync_catalogue(sender, **kwargs):
    from marketplace.services import catalogue_sync

    catalogue_sync()


def _close_request_connections(sender, **kwargs):
    """Close the finished request's database connections, persistent or not: Django's ASGI handler runs each
    request in a thread of its own that is not reused, so a connection kept for reuse would only be left open.
    (The gateway's own threads, which are reused, keep theirs; the test client, whose requests share the test's
    transaction, is not an ASGIHandler.)"""
    if isinstance(sender, type) and issubclass(sender, ASGIHandler):
        connections.close_all()


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        post_migrate.connect(_sync_catalogue, sender=self)
        request_finished.connect(_close_request_connections, dispatch_uid="close_request_connections")
