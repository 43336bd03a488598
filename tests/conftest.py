"""Shared fixtures.

postgres_server: one private PostgreSQL server for the test session (initdb + pg_ctl in
a temporary directory, as the `postgres` user when run as root, unix socket only),
stopped and deleted at the end. pg_db: a fresh database on it for one test.
"""
from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def postgres_server():
    from lab import pg_local

    server = pg_local.start(durable=False)
    yield server
    server.stop()


@pytest.fixture
def pg_db(postgres_server) -> str:
    """URL of a new, empty database (dropped after the test)."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url.replace("/postgres?", f"/{name}?")
    with psycopg.connect(postgres_server.url, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
