"""Attacks a hostile guest can make on the VMM's event loop, and the monitor's answer time under them.

Each attack drives the real VMM (`python -m device.vmm.process`) through device/guest/raw_guest.py, which
speaks docs/PROTOCOL.md from scratch, while the orchestrator's side keeps asking the
monitor `query-balloon` and records how long each answer took. The tests
(tests/test_hostile_loop.py) and `benchmarks/chain_attack.py` use these; the figures in
docs/BAD_INPUT.md come from the latter.
"""
from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field

from device.api import F_INDIRECT, F_NEXT
from lab.trials.model.hostile_vm import HostileVM

INDIRECT_BIT = 28
RING_GPA = 0x100000            # the attacked ring (a 32768-entry ring takes 852 KiB)
TABLE_GPA = 0x400000           # one indirect table, shared by every chain
MAX_TABLE = 4096               # the device's max_chain: the longest table it walks (32768 before)


@dataclass
class MonitorProbe:
    """Asks `query-balloon` again and again from a thread; keeps each answer's latency."""

    vm: HostileVM
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _started: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "MonitorProbe":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from lab.trials.monitor_client import MonitorError, QMPClient
        try:
            qmp = QMPClient(self.vm.monitor, timeout=600)   # its own connection: the test uses vm.qmp
        except (OSError, MonitorError) as e:
            self.failures.append(f"cannot connect to the monitor: {e}")
            self._started.set()
            return
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    qmp.execute("query-balloon")
                except MonitorError as e:
                    if not str(e).startswith("query-balloon:"):   # no answer at all: the attack worked
                        self.failures.append(str(e))
                        self._started.set()
                        return
                    # an error answer (DeviceNotActive while the device needs a reset) is an answer
                self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                self._started.set()
                time.sleep(0.005)
        finally:
            qmp.close()

    def stop(self) -> dict:
        """Stop probing (after at least one answer, or 60 s without any) and summarize."""
        self._started.wait(60)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=620)
        lat = sorted(self.latencies_ms)
        return {"answers": len(lat), "max_ms": round(lat[-1], 2) if lat else None,
                "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
                "median_ms": round(lat[len(lat) // 2], 2) if lat else None, "failures": self.failures}


def chain_attack(vm: HostileVM, ring_size: int = 32768, table_len: int = MAX_TABLE,
                 timeout_s: float = 1800.0) -> dict:
    """Item 3 of the hostile-guest report: every avail entry of an inflate ring of
    `ring_size` names one indirect table of `table_len` zero-length descriptors. Each
    chain is refused (an empty PFN array), but walking it is the expensive part. One
    kick; the monitor is probed until the device has used every chain."""
    g = vm.guest
    if g.mm is None:
        g.map_memory()
    g.reset()
    g.negotiate(g.offered())
    if not g.features & (1 << INDIRECT_BIT):
        raise RuntimeError("the device does not offer INDIRECT_DESC")
    q = g.add_queue(0, RING_GPA, ring_size)
    res = g.driver_ok()
    if res[0] != 0:
        raise RuntimeError(f"DRIVER_OK refused: {res}")
    table = bytearray(16 * table_len)
    for i in range(table_len):
        last = i + 1 == table_len
        struct.pack_into("<QIHH", table, 16 * i, TABLE_GPA, 0, 0 if last else F_NEXT, 0 if last else i + 1)
    g.write(TABLE_GPA, bytes(table))
    for i in range(ring_size):
        q.ring.desc(i, TABLE_GPA, 16 * table_len, F_INDIRECT)
    idle = MonitorProbe(vm).start()      # the same probe with no attack, under the same machine load
    time.sleep(2.0)
    idle_lat = idle.stop()
    probe = MonitorProbe(vm).start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    q.offer(range(ring_size))
    q.kick()
    done = q.wait_used(ring_size, timeout_s)
    took = time.perf_counter() - t0
    time.sleep(0.05)
    lat = probe.stop()
    loop = vm.counters().get("loop")     # the VMM's own worst wake-up, in CPU time (None before it had one)
    return {"attack": "chain", "ring_size": ring_size, "table_len": table_len, "all_used": done, "vmm_loop": loop,
            "seconds_to_use_all": round(took, 2), "chains_per_s": round(ring_size / took, 1),
            "monitor": lat, "monitor_without_attack": idle_lat, "vmm_alive": vm.alive()}
