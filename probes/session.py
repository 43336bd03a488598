"""ProbeSession: the lab's one handle on all probes for the length of a run.

Compiles one BPF module (all concerns) at the first attach() or load(), reuses it
across trials (clear() between them), and never crashes the experiment: when eBPF
is unavailable (not root, no BCC, no headers, no tracefs, a load failure) the
session runs degraded: backend "none", the reason recorded, a loud banner printed
to stderr once per process, and every method a no-op whose reading says so.

While its programs are attached the kernel's run-time statistics are on
(probes/bpf_stats.py), and every reading says what each program cost in its window
(probes/costs.py). Two concerns are opt-in (OPT_IN): `pagefree` runs once per freed
page in every arm, `syscall-time` adds a program at every system call's entry and two
clock reads per madvise/fallocate; the default set (DEFAULT_CONCERNS) keeps within
the lab's 5 % budget (docs/PROBES.md has the measurements).
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from device.virtio.metric_decl import COUNTER, GAUGE, TIMING, Metric, MetricSet, declared_by
from system.signals import signals_deferred
from probes import costs
from probes.bpf import (LAB_MAX_TARGETS, BpfModule, Concern, ConcernUnavailable, ProbeUnavailable, array_words,
                        array_zero, preflight)
from probes.bpf_stats import ProgStats, all_programs, stats_enabled
from probes.kicks import KINDS, OPS, KicksProbe, KicksReading
from probes.madvise import MadviseProbe, MadviseReading
from probes.markers import STAGES
from probes.pagealloc import PageAllocProbe
from probes.pagefree import PageFreeProbe
from probes.stages import StagesProbe, StagesReading, audit_semaphore, exe_has_audit

DEFAULT_CONCERNS = ("madvise", "kicks", "pagealloc", "stages")
OPT_IN = ("pagefree", "syscall-time")
CONCERNS = DEFAULT_CONCERNS + OPT_IN
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
    Metric("page_frees", GAUGE, "", "kmem:mm_page_free events (opt-in pagefree)"),
    Metric("page_free_pages", GAUGE, "", "pages those frees returned (opt-in pagefree)"),
    Metric("page_frees_batched", GAUGE, "", "kmem:mm_page_free_batched events (opt-in pagefree)"),
    Metric("page_faults", GAUGE, "", "user page faults (exceptions:page_fault_user)"),
    Metric("programs.*.events", GAUGE, "", "runs of this BPF program in the reading's window, every process's "
           "(bpf_stats run_cnt), or the events a calibrated cost is charged for (syscall_hook: the probed "
           "processes' syscalls but their discards; syscall_hook_discard: their madvise and fallocate calls; "
           "usdt_trap: stage markers) (probes/costs.py)"),
    Metric("programs.*.probed_events", GAUGE, "", "of those runs, the probed processes' (the program's own count)"),
    Metric("programs.*.ns_per_event", TIMING, "ns", "mean cost per event: the program's run time per run "
           "(bpf_stats), or the session's calibration (syscall_hook, syscall_hook_discard, usdt_trap)"),
    Metric("programs.*.ms", TIMING, "ms", "what this program (or hook, or trap) cost in the window"),
    Metric("probe_cost_ms", TIMING, "ms", "the probes' measured cost in the window: the sum of programs.*.ms"),
    Metric("foreign_bpf.programs", GAUGE, "", "other tools' BPF programs on the machine that ran in the window"),
    Metric("foreign_bpf.events", GAUGE, "", "their runs (every process's; bpf_stats)"),
    Metric("foreign_bpf.ms", TIMING, "ms", "their run time in the window (not the lab's cost: the machine's)"),
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
    programs: dict[str, dict[str, float]] = field(default_factory=dict)   # probes/costs.py: {name: {events, ns_per_event, ms}}
    probe_cost_ms: float | None = None                              # sum of programs' ms (None: bpf_stats unavailable)
    foreign_bpf: dict[str, float] = field(default_factory=dict)    # other tools' BPF programs: {programs, events, ms}
    missing: dict[str, str] = field(default_factory=dict)          # probe or pid -> why it is not measured

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (int keys become strings)."""
        d = asdict(self)
        d["per_pid"] = {str(p): v for p, v in self.per_pid.items()}
        return d

    def dumps(self, **kw: Any) -> str:
        return json.dumps(self.to_json(), **kw)


def check_concerns(concerns: Iterable[str]) -> list[str]:
    """The concerns in CONCERNS order; ValueError naming the choices for an unknown one."""
    given = set(concerns)
    unknown = given - set(CONCERNS)
    if unknown:
        raise ValueError(f"unknown probe(s) {sorted(unknown)}: choose from {', '.join(CONCERNS)} "
                         f"(opt-in: {', '.join(OPT_IN)})")
    if "syscall-time" in given and "madvise" not in given:
        raise ValueError("probe syscall-time times the madvise probe's calls: add madvise")
    return [c for c in CONCERNS if c in given]


def _stage_json(s: Any, timed: bool) -> dict[str, Any]:
    """A stage's totals; its syscalls' kernel ns are None (not measured) without syscall-time."""
    d = asdict(s)
    if not timed:
        d["madvise_kernel_ns"] = d["fallocate_kernel_ns"] = None
    return d


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

    def __init__(self, enabled: bool = True, concerns: Iterable[str] = DEFAULT_CONCERNS, quiet: bool = False) -> None:
        self.wanted = check_concerns(concerns)
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
        self._stats = ExitStack()                 # bpf_stats on while programs are attached
        self._stats_how: str | None = None
        self._progs0: dict[str, ProgStats] = {}   # program counters at the window's start
        self._machine0: dict[int, ProgStats] = {}  # every BPF program's on the machine, likewise
        self.calibration: costs.Calibration | None = None
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
        self._stats_off()
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
        factories = {"madvise": lambda: MadviseProbe(timed="syscall-time" in self.wanted), "kicks": KicksProbe,
                     "pagealloc": PageAllocProbe, "pagefree": PageFreeProbe, "stages": StagesProbe}
        usable: dict[str, Concern] = {}
        for name in self.wanted:
            if name not in factories:           # syscall-time: a flag of the madvise probe
                continue
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
        if isinstance(usable.get("stages"), StagesProbe):
            usable["stages"].intern(self.module.bpf, STAGES)
        self._stats_on()
        self._calibrate()                 # with no process probed
        self.module.set_targets(self.pids)
        self._progs0, self._machine0 = self._snapshot()
        return True

    # --- what the probes cost ---------------------------------------------------------
    def _stats_on(self) -> None:
        """The kernel's run-time statistics on (kept on until suspend() or detach())."""
        if self._stats_how is None:
            try:
                self._stats_how = self._stats.enter_context(stats_enabled())
                self.missing.pop("bpf_stats", None)
            except OSError as e:
                self.missing["bpf_stats"] = f"per-program costs not measured: {e}"

    def _stats_off(self) -> None:
        self._stats.close()
        self._stats_how = None

    def _snapshot(self) -> tuple[dict[str, ProgStats], dict[int, ProgStats]]:
        """This session's programs' counters, and every BPF program's on the machine."""
        if self.module is None or not self._stats_how:
            return {}, {}
        return self.module.program_stats(), all_programs()

    def _calibrate(self) -> None:
        """Measure the two costs outside the programs' run time, once (probes/costs.py)."""
        assert self.module is not None
        if not self._stats_how:
            return
        st = self.probes.get("stages")
        trap = None
        if isinstance(st, StagesProbe) and exe_has_audit(os.getpid()):
            try:
                trap = costs.calibrate_usdt_trap(self.module, st)
            except Exception as e:       # e.g. this interpreter's markers differ from the targets'
                self.missing["usdt_trap"] = f"USDT trap cost not calibrated: {e}"
        discard = costs.calibrate_discard_hook(self.module) if "madvise" in self.probes else None
        self.calibration = costs.Calibration(syscall_hook_ns=costs.calibrate_syscall_hook(self.module),
                                             syscall_hook_discard_ns=discard, usdt_trap_ns=trap)

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
        self._stats_off()

    def resume(self) -> None:
        if self.active and self.module is not None:
            self._guard("resuming the probes", self._resume)

    def _resume(self) -> None:
        assert self.module is not None
        self._stats_on()
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
        if any(c.syscalls for c in self.probes.values()):
            array_zero(self.module.bpf[b"lab_syscalls"])
        self._progs0, self._machine0 = self._snapshot()

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
        progs1, machine1 = self._snapshot()
        r = ProbeReading(backend="bcc", pids=list(self.pids), seconds=time.monotonic() - self._t0,
                         missing=dict(self.missing))
        per_pid: dict[int, dict[str, Any]] = {p: {} for p in self.pids}
        m = self.probes.get("madvise")
        if isinstance(m, MadviseProbe):
            mr: MadviseReading = m.read(bpf, self.module.targets)
            for sc in ("madvise", "fallocate"):
                t = mr.total(sc)
                setattr(r, f"{sc}_calls", t.calls)
                setattr(r, f"{sc}_kernel_ns", t.ns if mr.timed else None)
                setattr(r, f"{sc}_errors", t.errors)
                setattr(r, f"{sc}_bytes", t.bytes)
                for p in mr.pids() | set(self.pids):
                    tp = mr.total(sc, p)
                    d = per_pid.setdefault(p, {})
                    d[f"{sc}_calls"], d[f"{sc}_errors"] = tp.calls, tp.errors
                    d[f"{sc}_kernel_ns"] = tp.ns if mr.timed else None
            r.advice, r.fallocate_modes = mr.by_op("madvise"), mr.by_op("fallocate")
            r.hists.update(mr.hists())
        k = self.probes.get("kicks")
        if isinstance(k, KicksProbe):
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
        self._read_pages(r, per_pid)
        st = self.probes.get("stages")
        if isinstance(st, StagesProbe):
            sr: StagesReading = st.read(bpf, self.module.targets)
            timed = isinstance(m, MadviseProbe) and m.timed
            r.stages = {n: _stage_json(s, timed) for n, s in sorted(sr.stages().items())}
            r.stage_anomalies = sr.anomalies
            for p, stages in sr.per_pid.items():
                per_pid.setdefault(p, {})["stages"] = {n: _stage_json(s, timed) for n, s in sorted(stages.items())}
        r.per_pid = per_pid
        r.collisions = self.module.collisions()
        if self._stats_how and self._progs0:
            r.programs = costs.program_rows(self._progs0, progs1, self._probed_runs(r), self.calibration)
            r.probe_cost_ms = costs.total_ms(r.programs)
            ours = {st.prog_id for st in progs1.values()}
            r.foreign_bpf = costs.foreign_row(self._machine0, machine1, ours)
        return r

    def _probed_runs(self, r: ProbeReading) -> dict[str, int]:
        """Per program, its runs for the probed processes, from the programs' own counts."""
        assert self.module is not None
        out: dict[str, int] = {}
        if any(c.syscalls for c in self.probes.values()):
            out["syscalls"] = int(array_words(self.module.bpf[b"lab_syscalls"])[:, 0].sum())
        if r.madvise_calls is not None:
            out["discards"] = r.madvise_calls + (r.fallocate_calls or 0)
        for name, v in (("mm_page_alloc", r.page_allocs), ("page_fault_user", r.page_faults),
                        ("mm_page_free", r.page_frees), ("mm_page_free_batched", r.page_frees_batched)):
            if v is not None:
                out[name] = v
        return out

    def _read_pages(self, r: ProbeReading, per_pid: dict[int, dict[str, Any]]) -> None:
        """Allocations and faults (pagealloc), frees (opt-in pagefree): None where not loaded."""
        assert self.module is not None
        readings = [(name, c.read(self.module.bpf, self.module.targets)) for name, c in self.probes.items()
                    if isinstance(c, (PageAllocProbe, PageFreeProbe))]
        fields = {"pagealloc": ("allocs", "alloc_pages", "faults"), "pagefree": ("frees", "free_pages", "frees_batched")}
        for name, pr in readings:
            for f in fields[name]:
                setattr(r, "page_faults" if f == "faults" else f"page_{f}", pr.total(f))
            for p in set(pr.per_pid) | set(self.pids):
                ev = pr.per_pid.get(p)
                d = per_pid.setdefault(p, {})
                for f in fields[name]:
                    d["page_faults" if f == "faults" else f"page_{f}"] = getattr(ev, f) if ev else 0
            if name == "pagealloc":
                r.hists["page_alloc_order"] = {"unit": "order", "buckets": [
                    {"lo": o, "hi": o, "count": n} for o, n in sorted(pr.alloc_orders.items())]}
            for tp in pr.missing:
                r.missing[tp] = "tracepoint not on this kernel"

    # --- teardown -----------------------------------------------------------------
    def detach(self) -> None:
        """Detach and unload everything (the session is done; a new one recompiles)."""
        self._unload()
        self.closed = True

    def __enter__(self) -> "ProbeSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()
