"""ProbeSession: the lab's one handle on all probes for the length of a run.

Compiles one BPF module (all concerns) at the first attach() or load(), reuses it
across trials (clear() between them), and never crashes the experiment: when eBPF
is unavailable (not root, no BCC, no headers, no tracefs, a load failure) the
session runs degraded: backend "none", the reason recorded, a loud banner printed
to stderr once per process, and every method a no-op whose reading says so.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from device.virtio.metric_decl import COUNTER, GAUGE, TIMING, Metric, MetricSet, declared_by
from system.signals import signals_deferred
from probes.bpf import LAB_MAX_TARGETS, BpfModule, Concern, ConcernUnavailable, ProbeUnavailable, preflight
from probes.kicks import KINDS, OPS, KicksProbe, KicksReading
from probes.madvise import MadviseProbe, MadviseReading
from probes.pagealloc import PageAllocProbe, PageAllocReading
from probes.stages import StagesProbe, StagesReading, audit_semaphore, exe_has_audit

CONCERNS = ("madvise", "kicks", "pagealloc", "stages")
_banner_shown = False


def _banner(reason: str, fix: str) -> None:
    global _banner_shown
    if _banner_shown:
        return
    _banner_shown = True
    bar = "!" * 78
    lines = [bar, "!!  balloon-lab: eBPF PROBES ARE OFF - this run has NO kernel-side measurements",
             f"!!  why: {reason}"]
    if fix:
        lines.append(f"!!  fix: {fix}")
    lines += ["!!  (experiments still run; probe counters are recorded as null, backend 'none')",
              "!!  `balloon-lab doctor` checks every requirement and prints the exact fix.", bar]
    print("\n".join(lines), file=sys.stderr, flush=True)


# Per queue and eventfd kind, "<kind>_<op>" (probes/kicks/). Writes to config eventfds
# are the VMM's own config changes and writes to unregistered kinds are not the
# protocol's doing either way: those two are exact; every read, and kick and call
# writes (EVENT_IDX), depend on scheduling.
_EXACT_EVENTFD_OPS = ("config_write", "other_write")


def _eventfd_metric(kind: str, op: str) -> Metric:
    name = f"{kind}_{op}"
    what = {"write": "writes to", "read": "reads that returned data from", "read_empty": "reads that found nothing on"}[op]
    return Metric(f"per_queue.*.{name}", COUNTER if name in _EXACT_EVENTFD_OPS else GAUGE, "",
                  f"{what} the queue's {kind} eventfds")


_SYSCALL_METRICS = [
    (f"{call}_{what}", kind, unit, f"{call}(2) {doc}")
    for call in ("madvise", "fallocate")
    for what, kind, unit, doc in (("calls", COUNTER, "", "calls by the probed processes"),
                                  ("kernel_ns", TIMING, "ns", "time in the kernel, entry to exit"),
                                  ("errors", COUNTER, "", "calls that failed"),
                                  ("bytes", COUNTER, "bytes", "bytes named by the calls"))]

# What the probes measure (ProbeReading's numbers), declared once for the lab.
PROBE_METRICS = MetricSet("probes/session.py PROBE_METRICS", [
    Metric("seconds", TIMING, "s", "wall time the reading covers (since attach or clear)"),
    *(Metric(n, k, u, d) for n, k, u, d in _SYSCALL_METRICS),
    Metric("kicks", GAUGE, "", "writes to kick eventfds (EVENT_IDX skips some while the device polls)"),
    Metric("interrupts", GAUGE, "", "writes to call eventfds (EVENT_IDX skips some while the driver is busy)"),
    Metric("config_notifications", GAUGE, "", "writes to config-change eventfds"),
    Metric("device_wakeups", GAUGE, "", "reads of kick eventfds that returned data: device wake-ups"),
    Metric("device_rekicks", GAUGE, "", "kick eventfd writes by the device itself (budget spent, work left)"),
    Metric("interrupt_reads", GAUGE, "", "reads of call eventfds that returned data"),
    Metric("empty_reads", GAUGE, "", "reads of registered eventfds that found nothing (EAGAIN)"),
    Metric("eventfd_writes", GAUGE, "", "writes to any registered eventfd"),
    Metric("page_allocs", GAUGE, "", "kmem:mm_page_alloc events of the probed processes"),
    Metric("page_alloc_pages", GAUGE, "", "pages those allocations took (2^order each)"),
    Metric("page_frees", GAUGE, "", "kmem:mm_page_free events"),
    Metric("page_free_pages", GAUGE, "", "pages those frees returned"),
    Metric("page_frees_batched", GAUGE, "", "kmem:mm_page_free_batched events"),
    Metric("page_faults", GAUGE, "", "user page faults (exceptions:page_fault_user)"),
    Metric("advice.*", COUNTER, "", "madvise calls per advice (MADV_REMOVE, ...)"),
    Metric("fallocate_modes.*", COUNTER, "", "fallocate calls per mode"),
    *(_eventfd_metric(kind, op) for kind in KINDS for op in OPS),
    Metric("stages.*.count", COUNTER, "", "completed stages (begin/end marker pairs) of this name"),
    Metric("stages.*.ns", TIMING, "ns", "time between the stage's markers, by the probe's own clock"),
    *(Metric(f"stages.*.{n}", k, u, f"{d}, made inside the stage") for n, k, u, d in _SYSCALL_METRICS
      if n.endswith(("_calls", "_kernel_ns"))),
    Metric("stage_anomalies.*", COUNTER, "", "stage markers that did not pair up (probes/stages.c ANOM_*)"),
    Metric("collisions.*", COUNTER, "", "per-thread probe entries lost to a thread-id clash"),
])


@declared_by(PROBE_METRICS)
@dataclass
class ProbeReading:
    """What the probes saw since the last clear(). Counters are None when backend is 'none'."""

    backend: str
    reason: str | None = None
    pids: list[int] = field(default_factory=list)
    seconds: float = 0.0                       # wall time since attach()/clear()
    madvise_calls: int | None = None
    madvise_kernel_ns: int | None = None
    madvise_errors: int | None = None
    madvise_bytes: int | None = None
    fallocate_calls: int | None = None
    fallocate_kernel_ns: int | None = None
    fallocate_errors: int | None = None
    fallocate_bytes: int | None = None
    kicks: int | None = None                   # writes to kick eventfds
    interrupts: int | None = None              # writes to call eventfds
    config_notifications: int | None = None    # writes to config eventfds
    device_wakeups: int | None = None          # reads of kick eventfds that returned data
    device_rekicks: int | None = None          # kick-fd writes by the device itself (budget spent, work left)
    interrupt_reads: int | None = None         # reads of call eventfds that returned data
    empty_reads: int | None = None             # reads of registered eventfds that failed (EAGAIN)
    eventfd_writes: int | None = None          # writes to any registered eventfd (incl. kind "other")
    page_allocs: int | None = None
    page_alloc_pages: int | None = None
    page_frees: int | None = None
    page_free_pages: int | None = None
    page_frees_batched: int | None = None
    page_faults: int | None = None
    advice: dict[str, int] = field(default_factory=dict)            # madvise calls per advice
    fallocate_modes: dict[str, int] = field(default_factory=dict)
    per_pid: dict[int, dict[str, Any]] = field(default_factory=dict)
    per_queue: dict[str, dict[str, int]] = field(default_factory=dict)
    eventfds: list[dict[str, Any]] = field(default_factory=list)    # registered: {pid, fd, queue, kind}
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    stage_anomalies: dict[str, int] = field(default_factory=dict)
    collisions: dict[str, int] = field(default_factory=dict)        # per-thread entries lost to a tid clash
    hists: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)          # probe or pid -> why it is not measured

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (int keys become strings)."""
        d = asdict(self)
        d["per_pid"] = {str(p): v for p, v in self.per_pid.items()}
        return d

    def dumps(self, **kw: Any) -> str:
        return json.dumps(self.to_json(), **kw)


def _pid_list(pids: Iterable[int]) -> list[int]:
    out = []
    for p in pids:
        if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
            raise ValueError(f"pid {p!r}: must be a positive int")
        if p not in out:
            out.append(p)
    return out


class ProbeSession:
    """All probes, attached to a set of pids; see the module docstring for degraded mode."""

    def __init__(self, enabled: bool = True, concerns: Iterable[str] = CONCERNS, quiet: bool = False) -> None:
        unknown = set(concerns) - set(CONCERNS)
        if unknown:
            raise ValueError(f"unknown probe(s) {sorted(unknown)}: choose from {', '.join(CONCERNS)}")
        self.wanted = [c for c in CONCERNS if c in set(concerns)]
        self.quiet = quiet
        self.backend = "bcc"
        self.reason: str | None = None
        self.fix = ""
        self.missing: dict[str, str] = {}
        self.pids: list[int] = []
        self.module: BpfModule | None = None
        self.probes: dict[str, Concern] = {}
        self.closed = False
        self._t0 = time.monotonic()
        if not enabled:
            self._degrade("probes disabled by the caller (enabled=False)", "", banner=False)
            return
        problems = preflight()
        if problems:
            self._degrade("; ".join(p.detail for p in problems), " ; ".join(p.fix for p in problems))

    # --- state --------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.backend == "bcc"

    def _unload(self) -> None:
        """Detach every program and free the BPF module (never raises: teardown)."""
        if self.module is not None:
            with signals_deferred():
                try:
                    self._stages_detach_all()
                    self.module.close()
                except Exception:
                    pass
                self.module = None

    def _degrade(self, reason: str, fix: str, banner: bool = True) -> None:
        self.backend, self.reason, self.fix = "none", reason, fix
        self._unload()
        if banner and not self.quiet:
            _banner(reason, fix)

    def _guard(self, what: str, fn, *a: Any) -> Any:
        """Run a BPF operation; any failure degrades the session instead of the experiment.
        Ctrl-C and SIGTERM wait for it to finish (a BPF attach or detach cut in two
        leaves BCC's bookkeeping out of step with the kernel's)."""
        try:
            with signals_deferred():
                return fn(*a)
        except Exception as e:
            self._degrade(f"{what} failed: {type(e).__name__}: {e}", "run `balloon-lab doctor` for the fix")
            return None

    # --- loading --------------------------------------------------------------------
    def load(self, usdt_pid: int | None = None) -> bool:
        """Compile and load the module now (attach() does it if needed). True when loaded.

        The stage probe's USDT readers come from `usdt_pid`'s interpreter, else from this
        process's own when it carries python:audit (the lab spawns its processes with
        the same interpreter), else the stage probe is left out (recorded in `missing`).
        """
        if not self.active:
            return False
        if self.module is not None:
            return True
        if self.closed:
            return False
        return bool(self._guard("loading the BPF probes", self._load, usdt_pid))

    def _load(self, usdt_pid: int | None) -> bool:
        factories = {"madvise": MadviseProbe, "kicks": KicksProbe, "pagealloc": PageAllocProbe,
                     "stages": StagesProbe}
        usable: dict[str, Concern] = {}
        for name in self.wanted:
            c = factories[name]()
            try:
                c.cflags()
            except ConcernUnavailable as e:
                self.missing[name] = str(e)
                continue
            usable[name] = c
        usdt_text = ""
        if "stages" in usable:
            candidates = ([usdt_pid] if usdt_pid else []) + [os.getpid()]
            source = next((p for p in candidates if exe_has_audit(p)), None)
            if source is None:
                self.missing["stages"] = "no interpreter with the python:audit USDT marker to build the stage probe from"
                del usable["stages"]
            else:
                try:
                    usdt_text = usable["stages"].prepare(source)
                except Exception as e:
                    self.missing["stages"] = f"USDT python:audit unusable in pid {source}: {e}"
                    del usable["stages"]
        if not usable:
            raise ProbeUnavailable("no probe can be built on this kernel: " + "; ".join(self.missing.values()))
        self.module = BpfModule(list(usable.values()), usdt_text=usdt_text)
        self.probes = usable
        self.module.set_targets(self.pids)
        return True

    # --- targets --------------------------------------------------------------------
    def attach(self, pids: list[int]) -> None:
        """Watch exactly these pids (at most 8), replacing earlier ones; loads the probes on first use.

        A changed set of pids starts a fresh count (every counter zeroed), as for a new trial.
        """
        pids = _pid_list(pids)
        if len(pids) > LAB_MAX_TARGETS:
            raise ValueError(f"{len(pids)} pids: the probes watch at most {LAB_MAX_TARGETS} processes")
        if not self.active:
            self.pids = pids
            return
        if self.module is None:
            first_py = next((p for p in pids if exe_has_audit(p)), None)
            if not self.load(first_py):
                self.pids = pids
                return
        self._guard("attaching the probes", self._attach, pids)
        self._t0 = time.monotonic()

    def _attach(self, pids: list[int]) -> None:
        assert self.module is not None
        gone = [p for p in self.pids if p not in pids]
        changed = pids != self.pids
        self.pids = pids
        self.module.set_targets(pids)
        if changed:                      # slots now belong to other pids: start from zero
            self._clear()
        kicks = self.probes.get("kicks")
        for p in gone:
            if kicks is not None:
                kicks.unregister(self.module.bpf, p)
            self.missing.pop(f"stages:{p}", None)
        st = self.probes.get("stages")
        if isinstance(st, StagesProbe):
            for p in list(st.attached):
                if p not in pids:
                    st.detach(self.module.bpf, p)
            if not self.module.suspended:
                self._stages_attach(pids)

    def _stages_attach(self, pids: list[int]) -> None:
        st = self.probes.get("stages")
        if not isinstance(st, StagesProbe) or self.module is None:
            return
        for p in pids:
            if p in st.attached:
                continue
            if not exe_has_audit(p):
                self.missing[f"stages:{p}"] = f"pid {p}: executable has no python:audit USDT marker"
                continue
            try:
                st.attach(self.module.bpf, p)
                self.missing.pop(f"stages:{p}", None)
            except Exception as e:       # e.g. the process exited, or another interpreter build
                self.missing[f"stages:{p}"] = f"pid {p}: {e}"
                continue
            if audit_semaphore(p) == 0:  # attached, but Python would never fire the marker
                self.missing[f"stages:{p}"] = f"pid {p}: python:audit semaphore still 0 after attach"

    def _stages_detach_all(self) -> None:
        st = self.probes.get("stages")
        if isinstance(st, StagesProbe) and self.module is not None:
            st.detach_all(self.module.bpf)

    def register_eventfd(self, pid: int, fd: int, queue: int | None, kind: str) -> None:
        """Count write(2)/read(2) on `fd` of `pid` as queue `queue`'s `kind` (kick/call/config/other)."""
        KicksProbe.check(pid, fd, queue, kind)
        kicks = self.probes.get("kicks")
        if self.active and self.module is not None and isinstance(kicks, KicksProbe):
            self._guard("registering an eventfd", kicks.register, self.module.bpf, pid, fd, queue, kind)

    def unregister_eventfds(self, pid: int | None = None) -> None:
        """Forget the registered eventfds of `pid` (all when None): fds numbers get reused."""
        kicks = self.probes.get("kicks")
        if self.active and self.module is not None and isinstance(kicks, KicksProbe):
            self._guard("unregistering eventfds", kicks.unregister, self.module.bpf, pid)

    # --- overhead control --------------------------------------------------------
    def suspend(self) -> None:
        """Detach every program (tracepoints, uprobes, USDT semaphores) but keep the module loaded."""
        if self.active and self.module is not None:
            self._guard("suspending the probes", self._suspend)

    def _suspend(self) -> None:
        assert self.module is not None
        self._stages_detach_all()
        self.module.suspend()

    def resume(self) -> None:
        if self.active and self.module is not None:
            self._guard("resuming the probes", self._resume)

    def _resume(self) -> None:
        assert self.module is not None
        self.module.resume()
        self._stages_attach(self.pids)

    # --- readings -----------------------------------------------------------------
    def clear(self) -> None:
        """Zero every counter and histogram (registrations and targets stay)."""
        if self.active and self.module is not None:
            self._guard("clearing the probes", self._clear)
        self._t0 = time.monotonic()

    def _clear(self) -> None:
        assert self.module is not None
        for c in self.probes.values():
            c.clear(self.module.bpf)
        self.module.clear_collisions()

    def read(self) -> ProbeReading:
        if self.active and self.module is not None:
            r = self._guard("reading the probes", self._read)
            if r is not None:
                return r
        why = self.reason or ("probes detached" if self.closed else "probes not loaded yet (call attach())")
        return ProbeReading(backend="none", reason=why, pids=list(self.pids),
                            seconds=time.monotonic() - self._t0, missing=dict(self.missing))

    def _read(self) -> ProbeReading:
        assert self.module is not None
        bpf = self.module.bpf
        r = ProbeReading(backend="bcc", pids=list(self.pids), seconds=time.monotonic() - self._t0,
                         missing=dict(self.missing))
        per_pid: dict[int, dict[str, Any]] = {p: {} for p in self.pids}
        m = self.probes.get("madvise")
        if m is not None:
            mr: MadviseReading = m.read(bpf, self.module.targets)
            for sc in ("madvise", "fallocate"):
                t = mr.total(sc)
                setattr(r, f"{sc}_calls", t.calls)
                setattr(r, f"{sc}_kernel_ns", t.ns)
                setattr(r, f"{sc}_errors", t.errors)
                setattr(r, f"{sc}_bytes", t.bytes)
                for p in mr.pids() | set(self.pids):
                    tp = mr.total(sc, p)
                    d = per_pid.setdefault(p, {})
                    d[f"{sc}_calls"], d[f"{sc}_kernel_ns"], d[f"{sc}_errors"] = tp.calls, tp.ns, tp.errors
            r.advice, r.fallocate_modes = mr.by_op("madvise"), mr.by_op("fallocate")
            r.hists.update(mr.hists())
        k = self.probes.get("kicks")
        if k is not None:
            kr: KicksReading = k.read(bpf, self.module.targets)
            r.kicks, r.interrupts, r.config_notifications = kr.kicks, kr.interrupts, kr.config_notifications
            r.device_wakeups, r.interrupt_reads = kr.device_wakeups, kr.interrupt_reads
            r.device_rekicks = kr.device_rekicks
            r.empty_reads, r.eventfd_writes = kr.total(op="read_empty"), kr.total(op="write")
            r.per_queue = kr.per_queue()
            r.eventfds = [{"pid": p, "fd": fd, "queue": q, "kind": kind}
                          for (p, fd), (q, kind) in sorted(k.registered(bpf).items())]
            for p in {key[0] for key in kr.counts} | set(self.pids):
                d = per_pid.setdefault(p, {})
                for kind in KINDS:
                    d[f"{kind}_writes"] = kr.total(kind, "write", p)
                    d[f"{kind}_reads"] = kr.total(kind, "read", p)
        pa = self.probes.get("pagealloc")
        if pa is not None:
            pr: PageAllocReading = pa.read(bpf, self.module.targets)
            r.page_allocs, r.page_alloc_pages = pr.total("allocs"), pr.total("alloc_pages")
            r.page_frees, r.page_free_pages = pr.total("frees"), pr.total("free_pages")
            r.page_frees_batched, r.page_faults = pr.total("frees_batched"), pr.total("faults")
            for p in set(pr.per_pid) | set(self.pids):
                ev = pr.per_pid.get(p)
                d = per_pid.setdefault(p, {})
                for f in ("allocs", "alloc_pages", "frees", "free_pages", "frees_batched", "faults"):
                    d[f"page_{f}"] = getattr(ev, f) if ev else 0
            r.hists["page_alloc_order"] = {"unit": "order", "buckets": [
                {"lo": o, "hi": o, "count": n} for o, n in sorted(pr.alloc_orders.items())]}
            for tp in pr.missing:
                r.missing[tp] = "tracepoint not on this kernel"
        st = self.probes.get("stages")
        if st is not None:
            sr: StagesReading = st.read(bpf, self.module.targets)
            r.stages = {n: asdict(s) for n, s in sorted(sr.stages().items())}
            r.stage_anomalies = sr.anomalies
            for p, stages in sr.per_pid.items():
                per_pid.setdefault(p, {})["stages"] = {n: asdict(s) for n, s in sorted(stages.items())}
        r.per_pid = per_pid
        r.collisions = self.module.collisions()
        return r

    # --- teardown -----------------------------------------------------------------
    def detach(self) -> None:
        """Detach and unload everything (the session is done; a new one recompiles)."""
        self._unload()
        self.closed = True

    def __enter__(self) -> "ProbeSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()
