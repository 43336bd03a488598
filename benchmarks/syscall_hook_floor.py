#!/usr/bin/env python3
"""What a hook on the system-call path costs before any program does anything: the floor
under the probes' cost on the pfn arm, whose inflate is one madvise(2) per page.

    .venv/bin/python benchmarks/syscall_hook_floor.py [--rounds 25] [--pages 16384] [--json]

Interleaved rounds, each timing (this thread's CPU time per call) two system calls:

  discard   madvise(MADV_REMOVE) of one resident page of a memfd, page by page, as the
            device discards a PFN request (the pages made resident before each pass,
            outside its timing);
  getppid   the cheapest system call, as probes/costs.py calibrates the hook;

under five set-ups, in this order in every round:

  none           no program on the system-call path;
  empty          a raw tracepoint program on raw_syscalls:sys_exit that returns at once
                 (the kernel's slow syscall path and its dispatch, nothing else);
  lab            the lab's syscall programs (madvise + kicks, probes/syscalls.c), this
                 process not a target (every other process on the machine pays this);
  lab target     the same, this process a target (what the probed VMM pays);
  lab + stats    and the kernel's run-time statistics on (kernel.bpf_stats_enabled), as
                 in a probed trial.

The table gives the median ns per call and what each set-up adds to `none`, and, for the
discard, that as a share of `none`: the least share of a pfn page's time that any exact
count of madvise calls costs on this kernel, when the hooks that would see do_madvise
alone are not there: the script first tries them (an fentry program on do_madvise, and
tracefs's kprobe_events) and says what it found. Run it as root on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device.virtio.discard import ResidentPages  # noqa: E402
from probes.bpf import BpfModule  # noqa: E402
from probes.bpf_stats import stats_enabled  # noqa: E402
from probes.kicks import KicksProbe  # noqa: E402
from probes.madvise import MadviseProbe  # noqa: E402

SETUPS = ("none", "empty", "lab", "lab target", "lab + stats")
EMPTY = b"RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }"


def cheaper_hooks() -> dict[str, str]:
    """Whether this kernel offers a hook on do_madvise alone (fentry, kprobe), in words."""
    from bcc import BPF
    out = {}
    try:
        BPF(text=b"KFUNC_PROBE(do_madvise) { return 0; }").cleanup()
        out["fentry"] = "an fentry program on do_madvise loads"
    except Exception as e:      # BCC raises a bare Exception; the kernel's errno is in its log
        said = str(e).splitlines()[0][:80]
        why = "the kernel refused it as root: EPERM" if "privileges" in said and os.geteuid() == 0 else said
        out["fentry"] = f"an fentry program on do_madvise does not load ({why})"
    kp = Path("/sys/kernel/tracing/kprobe_events")
    out["kprobe"] = "kprobes: tracefs has kprobe_events" if kp.exists() else "kprobes: none (no kprobe_events in tracefs)"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--pages", type=int, default=16384, help="discards per timed pass")
    ap.add_argument("--getppid", type=int, default=200_000, help="getppid calls per timed pass")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("syscall_hook_floor: needs root (BPF programs)", file=sys.stderr)
        return 2
    from bcc import BPF

    rp = ResidentPages(a.pages, "syscall-hook-floor")

    def discard() -> float:
        rp.populate()
        t0 = time.thread_time_ns()
        rp.discard_each()                                # per page, as the protocol is
        return (time.thread_time_ns() - t0) / a.pages

    def getppid() -> float:
        g = os.getppid
        t0 = time.thread_time_ns()
        for _ in range(a.getppid):
            g()
        return (time.thread_time_ns() - t0) / a.getppid

    empty = BPF(text=EMPTY)
    empty.detach_raw_tracepoint(b"sys_exit")
    lab = BpfModule([MadviseProbe(), KicksProbe()])
    lab.suspend()
    res: dict[str, dict[str, list[float]]] = {s: {"discard": [], "getppid": []} for s in SETUPS}

    def measure(setup: str) -> None:
        res[setup]["discard"].append(discard())
        res[setup]["getppid"].append(getppid())

    try:
        discard(), getppid()                              # warm-up
        for _ in range(a.rounds):
            measure("none")
            empty.attach_raw_tracepoint(tp=b"sys_exit", fn_name=b"raw_tracepoint__sys_exit")
            measure("empty")
            empty.detach_raw_tracepoint(b"sys_exit")
            lab.set_targets([])
            lab.resume()
            measure("lab")
            lab.set_targets([os.getpid()])
            measure("lab target")
            with stats_enabled():
                measure("lab + stats")
            lab.suspend()
    finally:
        empty.cleanup()
        lab.close()
        rp.close()

    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in res.items()}
    hooks = cheaper_hooks()
    out = {"rounds": a.rounds, "pages": a.pages, "load": os.getloadavg(), "cheaper_hooks": hooks, "median_ns": med,
           "added_ns": {s: {k: med[s][k] - med["none"][k] for k in med[s]} for s in SETUPS[1:]}}
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"ns per call, median of {a.rounds} interleaved rounds (load {out['load'][0]:.2f}); "
          f"added to `none`, and for the discard its share of `none`")
    print(f"{'set-up':<13}{'discard':>10}{'added':>9}{'share':>9}{'getppid':>10}{'added':>9}")
    for s in SETUPS:
        d, g = med[s]["discard"], med[s]["getppid"]
        dd, dg = d - med["none"]["discard"], g - med["none"]["getppid"]
        share = 100 * dd / med["none"]["discard"]
        print(f"{s:<13}{d:10.0f}{dd:+9.0f}{share:+8.1f}%{g:10.0f}{dg:+9.0f}")
    for text in hooks.values():
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
