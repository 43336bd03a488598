"""Shared fixtures.

postgres_server: one private PostgreSQL server for the test session (initdb + pg_ctl in
a temporary directory, as the `postgres` user when run as root, unix socket only),
stopped and deleted at the end. pg_db: a fresh database on it for one test.

The device rig (device/rig.py, after Firecracker's balloon test_utils.rs): a real
BalloonDevice over a real sealed memfd with real eventfds, in the test's process.
make_device_rig: a factory, every rig it makes is closed after the test.
device_rig: a live pfn device over 64 MiB, inflate and deflate queues (size 8) set up.
fuzz_device_target: the fuzzer's device and ring targets (fuzz/device_target.py), one
memfd per fuzz layout, shared by a test module.
"""
from __future__ import annotations

import os
import uuid

import pytest

from device.rig import DeviceRig
from probes.bpf import REQUIRE_ENV, essentials_missing

# device_rig's queues: rings at these guest-physical addresses
DEVICE_RIG_RINGS = {0: 0x10000, 1: 0x11000}


def pytest_runtest_setup(item):
    """Where BALLOON_LAB_REQUIRE_EBPF=1 (.ci/run), an `ebpf` test whose eBPF cannot work
    (not root, BCC not loadable) fails with the reason, before its fixtures, instead of
    skipping: a CI run whose BCC broke must not stay green (probes.bpf.ebpf_skip_reason)."""
    if item.get_closest_marker("ebpf") and os.environ.get(REQUIRE_ENV) == "1":
        missing = essentials_missing()
        if missing:
            pytest.fail(f"eBPF is required here ({REQUIRE_ENV}=1) but {missing}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_server():
    from lab.store import pg_local

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


@pytest.fixture
def make_device_rig():
    """DeviceRig(**options), closed after the test."""
    rigs: list[DeviceRig] = []

    def make(**options) -> DeviceRig:
        rig = DeviceRig(**options)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def device_rig(make_device_rig) -> DeviceRig:
    """A live pfn device over 64 MiB of guest RAM: every offered feature accepted,
    inflate and deflate queues (size 8) at DEVICE_RIG_RINGS, DRIVER_OK."""
    rig = make_device_rig(mib=64, protocol="pfn")
    rig.start(DEVICE_RIG_RINGS, 8)
    return rig


@pytest.fixture(scope="module")
def fuzz_device_target():
    from fuzz.device_target import DeviceTarget

    target = DeviceTarget()
    yield target
    target.close()
