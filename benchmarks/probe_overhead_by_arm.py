#!/usr/bin/env python3
"""What each probe costs each protocol arm, end to end: twin trials (lab/trials/twins.py) with
one probe set attached at a time, the other twin with every program detached.

    .venv/bin/python benchmarks/probe_overhead_by_arm.py --guest-mib 512 --inflate-mib 384 --pairs 5

For every probe set (each concern alone, then all four) one interleaved experiment runs
every arm; each round's trial is a twin pair with the same seed, so the per-pair ratio
probed/unprobed of the inflate total is the probes' cost on that arm. Prints one table
(median ratio with its 95 % bootstrap CI, per arm and probe set) and, with --json, the
numbers behind docs/PROBES.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from lab.machine import environment
from lab.trials import twins
from lab.trials.experiment import run_experiment
from lab.trials.arm_trial import trial_fn
from lab.trials.spec import BALLOON_ARMS, ExperimentSpec
from lab.store.store import Store
from probes.session import CONCERNS, DEFAULT_CONCERNS, ProbeSession


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest-mib", type=int, default=512)
    ap.add_argument("--inflate-mib", type=int, default=384)
    ap.add_argument("--pairs", type=int, default=5, help="twin pairs per arm and probe set")
    ap.add_argument("--arms", default=",".join(BALLOON_ARMS))
    ap.add_argument("--workload", default="aged")
    ap.add_argument("--sets", default=",".join(DEFAULT_CONCERNS) + ",pagefree,default,all",
                    help="probe sets to measure: concern names (syscall-time goes with madvise), 'default' "
                         "(the default set) and/or 'all' (the opt-in ones too)")
    ap.add_argument("--db", type=Path, default=None, help="keep the runs in this database")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    sets = [s.strip() for s in a.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in ("all", "default") and s not in CONCERNS]
    if unknown:
        print(f"error: unknown probe set(s) {unknown}: choose from {', '.join(CONCERNS)}, default, all",
              file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix="probe-overhead-") if a.db is None else None
    db = a.db or Path(tmp.name) / "overhead.db"
    out: dict[str, dict] = {}
    t0 = time.monotonic()
    load0 = environment.loadavg()
    with Store(db) as store:
        for name in sets:
            concerns = {"all": CONCERNS, "default": DEFAULT_CONCERNS,
                        "syscall-time": ("madvise", "syscall-time")}.get(name, (name,))
            spec = ExperimentSpec(name=f"probe-overhead-{name}", arms=a.arms.split(","), guest_mib=a.guest_mib,
                                  inflate_mib=a.inflate_mib, workload=a.workload, trials=a.pairs, warmups=0,
                                  probes=True, twins=True)
            session = ProbeSession(concerns=concerns)
            try:
                run_id = run_experiment(spec, trial_fn(session), store, progress=False, probe_session=session)
            finally:
                session.detach()
            rows = twins.arm_overheads(store.trials(run_id))
            out[name] = {"run_id": run_id, "backend": session.backend, "arms": {
                r.arm: {"pairs": r.pairs, "unprobed_ms": r.unprobed_ms, "probed_ms": r.probed_ms,
                        "ratio": r.ratio} for r in rows}}
            print(f"{name}: run {run_id} done", file=sys.stderr)
    summary = {"guest_mib": a.guest_mib, "inflate_mib": a.inflate_mib, "workload": a.workload, "pairs": a.pairs,
               "loadavg_before": load0, "loadavg_after": environment.loadavg(),
               "seconds": round(time.monotonic() - t0, 1), "sets": out}
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        arms = a.arms.split(",")
        print(f"inflate total, probes attached / detached (median of per-pair ratios [95 % CI]), "
              f"{a.guest_mib}/{a.inflate_mib} MiB {a.workload}, {a.pairs} twin pairs per cell, "
              f"load {load0} -> {summary['loadavg_after']}")
        print(f"{'probes':<12}" + "".join(f"{arm:>26}" for arm in arms))
        for name, res in out.items():
            cells = []
            for arm in arms:
                r = res["arms"].get(arm)
                if r is None:
                    cells.append("-")
                    continue
                med, lo, hi = r["ratio"]
                cells.append(f"{med:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{med:.3f}")
            print(f"{name:<12}" + "".join(f"{c:>26}" for c in cells))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
