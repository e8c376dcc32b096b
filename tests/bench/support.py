"""What several benchmarks share: a free loopback port and a throwaway PostgreSQL database."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from billing.localpeer import free_port  # noqa: F401 - one loopback port picker for the product and tests

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("BENCH_POSTGRES_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def throwaway_postgres(prefix: str) -> Iterator[str]:
    """Create an empty database named after ``prefix`` and this process, yield its URL, drop it after (forcing
    out connections that processes the benchmark started may still hold)."""
    import psycopg

    name = f"{prefix}_{os.getpid()}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
