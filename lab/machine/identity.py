"""Which host ran a trial: its identity, recorded with every trial.

A balloon protocol's cost depends on the host (kernel, CPU, memory, how guest RAM is
backed), so timings are compared only within one host; exact counters may be compared
across hosts. The host id is what groups trials: by default the machine's host name,
or BALLOON_LAB_HOST_ID / `balloon-lab worker --host-id` (two workers on one machine can
then stand for two hosts). The rest of the identity says what that host was.
"""
from __future__ import annotations

import functools
import os
import platform
import socket
from dataclasses import asdict, dataclass
from typing import Any

from lab.machine import environment

HOST_ID_ENV = "BALLOON_LAB_HOST_ID"
_THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


@dataclass(frozen=True)
class HostIdentity:
    """One host as a trial saw it. `load` is the 1/5/15-minute load average when the
    trial was stored: the one field that changes from trial to trial."""

    host_id: str
    hostname: str
    machine_id: str | None
    kernel: str
    cpu_model: str | None
    cores: int | None
    memory_bytes: int | None
    backing: dict[str, Any]
    load: list[float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: what the host is (its load is per trial, shown beside it)."""
        mem = "?" if self.memory_bytes is None else f"{self.memory_bytes / (1 << 30):.1f} GiB"
        mid = (self.machine_id or "?")[:12]
        return (f"{self.host_id}: {self.hostname} (machine {mid}), kernel {self.kernel}, CPU {self.cpu_model}, "
                f"{self.cores} cores, memory {mem}, THP shmem {self.backing.get('thp_shmem')}, "
                f"hugetlb pages {self.backing.get('hugepages_total')}")


def describe(host: dict[str, Any] | None, host_id: str | None = None) -> str:
    """One line for a stored identity (a dict from the store; None for old trials)."""
    if not host:
        return f"{host_id or '?'}: no identity recorded (stored before hosts were recorded)"
    fields = {k: host.get(k) for k in HostIdentity.__dataclass_fields__}
    fields["backing"] = fields["backing"] or {}
    return HostIdentity(**fields).describe()


def host_id() -> str:
    """This process's host id: $BALLOON_LAB_HOST_ID, else the host name."""
    return os.environ.get(HOST_ID_ENV, "").strip() or socket.gethostname()


def check_host_id(value: str) -> str:
    """A host id as typed by a user; ValueError with the rule if it is unusable."""
    v = value.strip()
    if not v or len(v) > 100 or not all(c.isalnum() or c in "-_.:" for c in v):
        raise ValueError(f"host id {value!r}: use 1-100 letters, digits and - _ . :")
    return v


def identity(hid: str | None = None) -> HostIdentity:
    """This machine now, under host id `hid` (default host_id())."""
    return HostIdentity(host_id=hid or host_id(), load=environment.loadavg(), backing=backing(), **_static())


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    """The parts that do not change while a process lives (read once)."""
    return {"hostname": socket.gethostname(), "machine_id": machine_id(), "kernel": platform.release(),
            "cpu_model": environment.cpu_model(), "cores": os.cpu_count(), "memory_bytes": environment.meminfo_bytes("MemTotal")}


def machine_id() -> str | None:
    """systemd's /etc/machine-id (D-Bus's copy as a fallback): tells two machines with
    the same host name apart."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                v = f.read().strip()
            if v:
                return v
        except OSError:
            continue
    return None


def backing() -> dict[str, Any]:
    """How this host can back guest RAM: shared-memory THP mode and the hugetlb pool."""
    try:
        with open(_THP_SHMEM) as f:
            text = f.read()
        thp = next((w.strip("[]") for w in text.split() if w.startswith("[")), text.strip())
    except OSError:
        thp = None
    total = environment.meminfo_bytes("HugePages_Total")  # a count, not kB: undo the kB scaling
    return {"thp_shmem": thp, "hugepages_total": None if total is None else total // 1024,
            "hugepage_bytes": environment.meminfo_bytes("Hugepagesize")}
