"""Where a ring round trip goes, from the scheduler's side: one inflate, both processes.

BCC's `offcputime` and `offwaketime` need kprobes, which this kind of kernel lacks, so
this is their account rebuilt on the `sched:sched_switch` and `sched:sched_wakeup`
tracepoints (their documented fields only, no kernel struct read). For the VMM and the
guest of one `pfn` inflate it sums, per process:

  on CPU        switched in until switched out
  blocked       switched out sleeping until woken (waiting for a kick, a call, the monitor)
  wake latency  woken until switched in (the wake-up half of a round trip)
  preempted     switched out runnable until switched in again, and how often the
                process that took the CPU was the other one of the pair

and counts wake-ups aimed at the waker's own CPU. Run it as root beside nothing else:

    python benchmarks/ring_sched.py [--protocol pfn] [--guest-mib 2048 --inflate-mib 1792]
        [--vmm-option FIELD=VALUE ...] [--guest-option FIELD=VALUE ...]
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device.virtio.layout import MiB, PAGE_SHIFT  # noqa: E402
from lab.trials.model.balloon_trial import BalloonTrial  # noqa: E402
from lab.trials.model.processes import LabProcesses  # noqa: E402
from lab.trials.model.monitor_ops import balloon_op  # noqa: E402

BPF_TEXT = r"""
struct state { u64 out_ts; u64 woke_ts; u64 in_ts; u32 runnable; };
BPF_HASH(role, u32, u32);                 // pid -> 0 VMM, 1 guest
BPF_HASH(st, u32, struct state);
// per role: 0 on-CPU ns, 1 blocked ns, 2 blocked count, 3 wake-latency ns, 4 wake-ups,
// 5 preempted ns, 6 preemptions, 7 preempted by the peer, 8 woken on the waker's CPU,
// 9 switches in
BPF_ARRAY(acc, u64, 20);
BPF_HISTOGRAM(wakelat, int, 64);          // role * 32 + log2(us)

static inline void add(u32 r, int k, u64 v) { int i = r * 10 + k; u64 *p = acc.lookup(&i); if (p) __sync_fetch_and_add(p, v); }

TRACEPOINT_PROBE(sched, sched_switch) {
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid, next = args->next_pid;
    u32 *rp = role.lookup(&prev);
    if (rp) {
        u32 r = *rp;
        struct state *s = st.lookup(&prev);
        if (s) {
            if (s->in_ts) add(r, 0, now - s->in_ts);
            s->out_ts = now; s->woke_ts = 0; s->in_ts = 0;
            s->runnable = (args->prev_state & 0xff) == 0;   // R or R+: preempted
            if (s->runnable) {
                add(r, 6, 1);
                u32 *np = role.lookup(&next);
                if (np && *np != r) add(r, 7, 1);
            }
        }
    }
    u32 *rn = role.lookup(&next);
    if (rn) {
        u32 r = *rn;
        struct state *s = st.lookup(&next);
        if (s) {
            if (s->out_ts) {
                if (s->runnable) add(r, 5, now - s->out_ts);
                else if (s->woke_ts) {
                    u64 lat = now - s->woke_ts;
                    add(r, 3, lat); add(r, 4, 1);
                    int slot = r * 32 + bpf_log2l(lat / 1000 + 1);
                    wakelat.increment(slot);
                }
            }
            s->in_ts = now; s->out_ts = 0;
            add(r, 9, 1);
        }
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup) {
    u32 pid = args->pid;
    u32 *rp = role.lookup(&pid);
    if (!rp) return 0;
    struct state *s = st.lookup(&pid);
    if (!s || !s->out_ts || s->runnable || s->woke_ts) return 0;
    u64 now = bpf_ktime_get_ns();
    s->woke_ts = now;
    add(*rp, 1, now - s->out_ts); add(*rp, 2, 1);
    if (args->target_cpu == bpf_get_smp_processor_id()) add(*rp, 8, 1);
    return 0;
}
"""

NAMES = ("on_cpu_ns", "blocked_ns", "blocked", "wake_latency_ns", "wakeups", "preempted_ns", "preemptions",
         "preempted_by_peer", "woken_on_wakers_cpu", "switches_in")


def _fields(items: list[str]) -> dict:
    """FIELD=VALUE items as launch-record fields (the value a Python literal, else a string)."""
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k.strip().replace("-", "_")] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip().replace("-", "_")] = v
    return out


def measure(a: argparse.Namespace) -> dict:
    from bcc import BPF
    t = BalloonTrial(protocol=a.protocol, guest_mib=a.guest_mib, inflate_mib=a.inflate_mib,
                     workload=a.workload, seed=a.seed)
    lp = LabProcesses(t, vmm=_fields(a.vmm_option), guest=_fields(a.guest_option))
    try:
        lp.agent.execute("workload-prepare", {"name": t.workload, "params": {}, "seed": a.seed})
        b = BPF(text=BPF_TEXT)
        roles = {"vmm": lp.pids["vmm"], "guest": lp.pids["guest"]}
        for r, pid in enumerate(roles.values()):
            b["role"][b["role"].Key(pid)] = b["role"].Leaf(r)
            b["st"][b["st"].Key(pid)] = b["st"].Leaf()
        op = balloon_op(lp, "inflate", round(a.inflate_mib * MiB) >> PAGE_SHIFT, None)
        acc = [v.value for _, v in sorted(b["acc"].items(), key=lambda kv: kv[0].value)]
        hist = {k.value: v.value for k, v in b["wakelat"].items()}
    finally:
        lp.close()
    out = {"op": {k: op[k] for k in ("requests", "kicks", "interrupts", "device_wakeups", "budget_yields")},
           "stages_ns": op["stages_ns"]}
    for r, name in enumerate(roles):
        out[name] = dict(zip(NAMES, acc[r * 10:(r + 1) * 10]))
        out[name]["wake_latency_hist_us"] = {f"<{(1 << s) - 1 if s else 0}": n
                                             for k, n in sorted(hist.items()) if k // 32 == r
                                             for s in [k % 32]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ring_sched", description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="pfn")
    ap.add_argument("--guest-mib", type=int, default=2048)
    ap.add_argument("--inflate-mib", type=float, default=1792)
    ap.add_argument("--workload", default="aged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vmm-option", action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the VMM's launch record, VmmOptions (repeatable; e.g. poll_us=50)")
    ap.add_argument("--guest-option", action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the guest's launch record, GuestOptions (repeatable; e.g. halt_poll_us=50)")
    a = ap.parse_args(argv)
    r = measure(a)
    st, op = r["stages_ns"], r["op"]
    print(f"{a.protocol} inflate {a.inflate_mib:g} MiB: total {st['total'] / 1e6:.0f} ms, transmit "
          f"{st['transmit'] / 1e6:.0f} ms ({st['transmit'] / op['requests'] / 1e3:.0f} us/request), requests "
          f"{op['requests']}, kicks {op['kicks']}, interrupts {op['interrupts']}, device wake-ups "
          f"{op['device_wakeups']}, budget yields {op['budget_yields']}")
    print(f"{'process':<7}{'on CPU ms':>10}{'blocked ms':>11}{'(n)':>7}{'wake lat ms':>12}{'(n)':>7}{'us/wake':>8}"
          f"{'preempted ms':>13}{'(n)':>7}{'by peer':>8}{'same CPU':>9}")
    for name in ("vmm", "guest"):
        p = r[name]
        print(f"{name:<7}{p['on_cpu_ns'] / 1e6:10.1f}{p['blocked_ns'] / 1e6:11.1f}{p['blocked']:7d}"
              f"{p['wake_latency_ns'] / 1e6:12.1f}{p['wakeups']:7d}"
              f"{p['wake_latency_ns'] / max(1, p['wakeups']) / 1e3:8.1f}{p['preempted_ns'] / 1e6:13.1f}"
              f"{p['preemptions']:7d}{p['preempted_by_peer']:8d}{p['woken_on_wakers_cpu']:9d}")
    for name in ("vmm", "guest"):
        print(f"{name} wake-up latency histogram (us: count): {r[name]['wake_latency_hist_us']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
