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
lab_store: one real small `balloon-lab compare` per session, for tests that read a store.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from device.rig import DeviceRig
from probes.bpf import REQUIRE_ENV, essentials_missing

# A shell starts a background job (`./run-tests &`, nohup, some CI runners) with SIGINT
# ignored, and an ignored SIGINT stays ignored in every child: the Ctrl-C tests would then
# send a signal nobody hears. Python's own handler is put back here; a handler (unlike
# SIG_IGN) is reset to the default at exec, so the lab's processes hear Ctrl-C again too.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The command line under test: this checkout's, or another install's when
# BALLOON_LAB_UNDER_TEST names one (e.g. an older revision's, to see a CLI-level test
# fail where that revision lacks the fix).
BALLOON_LAB = os.environ.get("BALLOON_LAB_UNDER_TEST") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin"
                                                               / "balloon-lab")

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


@dataclass(frozen=True)
class LabStore:
    """A real results store made by the real CLI: what `balloon-lab compare` printed
    (stdout, stderr) and the run it stored."""

    db: Path
    run_id: str
    command: tuple[str, ...]
    stdout: str
    stderr: str


# The README's three arms at the smallest size that still has probes (twin trials) and a
# comparison: about half a minute here.
LAB_STORE_COMPARE = ("compare", "--arms", "pfn,bitmap,chunks", "--guest-mib", "256", "--inflate-mib", "128",
                     "--trials", "2", "--warmups", "0", "--extra-probes", "syscall-time")


@pytest.fixture(scope="session")
def lab_store(tmp_path_factory) -> LabStore:
    """One real `balloon-lab compare` per test session (real VMM and guest processes,
    the BCC probes, SQLite), for the tests that read a store as a user would."""
    db = tmp_path_factory.mktemp("lab-store") / "lab.db"
    cmd = (BALLOON_LAB, *LAB_STORE_COMPARE, "--db", str(db))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = re.search(r"^run ([0-9a-f]{12})\b", out.stdout, re.M).group(1)
    return LabStore(db, run_id, cmd, out.stdout, out.stderr)
