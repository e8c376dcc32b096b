"""Database connections under ASGI: each HTTP request runs in a thread of its own, so a connection it opened
must be closed when it finishes, persistent connections or not (PostgreSQL once ran out of them under the
1,000-car benchmark's polling). The gateway's long-lived database threads are another matter (tests/fleet)."""

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.db.backends.signals import connection_created

from marketplace.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def test_every_http_request_closes_the_connections_it_opened():
    opened = []

    def record(sender, connection, **kwargs):
        opened.append(connection)

    connection_created.connect(record)
    try:
        for _ in range(5):
            response = async_to_sync(HttpCommunicator(application, "GET", "/healthz", headers=[(b"host", b"127.0.0.1")]).get_response)()
            assert response["status"] == 200
    finally:
        connection_created.disconnect(record)
    assert len(opened) >= 5  # one per request thread at least: each request ran the health check's query
    assert all(wrapper.connection is None for wrapper in opened)  # and each was closed when it finished
