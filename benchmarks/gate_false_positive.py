#!/usr/bin/env python3
"""How often does the gate cry wolf? A/A comparisons: the same spec run twice, gated
against each other, N times. Every "regression" found is a false positive; the goal
is a rate of at most 5 %.

    .venv/bin/python benchmarks/gate_false_positive.py --trial-fn madvise-loop --repeats 20
    .venv/bin/python benchmarks/gate_false_positive.py --trial-fn runner --repeats 20 --spec spec.toml

--trial-fn madvise-loop is self-contained real work (no VMM): a memfd "guest", pages
touched at random, then freed by madvise(MADV_REMOVE) once per page (arm pfn) or once
per contiguous run (other arms), verified from the memfd's allocated blocks.
--trial-fn runner uses lab.trials.arm_trial.run_trial (the real VMM + guest), imported lazily.
Each pair is judged by both gate rules (absolute, and --relative). Exit status: 0 if
every evaluated rule's observed rate is within --goal, 1 if one is above it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sst

from device.virtio.ram import GuestRAM
from device.virtio.layout import PAGE_SHIFT, PAGE_SIZE, GuestLayout
from lab.trials.experiment import run_experiment
from lab.gate.compare import run_gate
from lab.gate.inputs import GateInputError, load_input
from lab.gate.thresholds import Thresholds
from lab.trials.spec import ExperimentSpec, SpecError, load_spec
from lab.store.store import Store


def madvise_loop_trial(spec: ExperimentSpec, arm: str, rnd: int) -> dict[str, Any]:
    """Balloon-like real work on a memfd: touch spec.inflate_mib of randomly placed
    pages, then discard them per page (pfn) or per run of contiguous pages."""
    t_start = time.perf_counter_ns()
    layout = GuestLayout.pc(spec.guest_mib)
    ram = GuestRAM.create(layout, name="gate-fp-madvise-loop")
    try:
        n_pages = ram.size >> PAGE_SHIFT
        want = (spec.inflate_mib << 20) >> PAGE_SHIFT
        # the same pages for every arm of a round: the seed depends on the round only
        rng = np.random.default_rng(spec.seed + rnd)
        pages = np.sort(rng.choice(n_pages, size=want, replace=False))
        t0 = time.perf_counter_ns()
        np.frombuffer(ram.mem, dtype=np.uint8)[pages << PAGE_SHIFT] = 1  # fault every page in
        t1 = time.perf_counter_ns()
        touched = ram.allocated_bytes()
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = pages[np.r_[0, breaks]]
        lengths = np.diff(np.r_[0, breaks, pages.size])
        if arm == "pfn":
            # the PFN protocol's cost model is one syscall per page: this loop IS the workload
            for p in pages.tolist():
                ram.discard(p << PAGE_SHIFT, PAGE_SIZE)
            calls = int(pages.size)
        else:
            for s, n in zip(starts.tolist(), lengths.tolist()):
                ram.discard(s << PAGE_SHIFT, n << PAGE_SHIFT)
            calls = int(starts.size)
        t2 = time.perf_counter_ns()
        left = ram.allocated_bytes()
    finally:
        ram.close()
    hist = np.bincount(np.log2(lengths).astype(int))
    stages = {"alloc": t1 - t0, "discard": t2 - t1, "total": t2 - t0}
    return {
        "protocol": arm, "guest_mib": spec.guest_mib, "inflate_mib": spec.inflate_mib,
        "pages": int(pages.size), "discard_calls": calls, "runs": int(starts.size),
        "memfd_freed_bytes": int(touched - left),
        "verified": bool(touched >= pages.size * PAGE_SIZE and left == 0),
        "inflate": {"stages_ns": stages, "discard_calls": calls, "runs": int(starts.size),
                    "run_length_hist": {str(1 << i): int(c) for i, c in enumerate(hist) if c}},
        "wall_ns": time.perf_counter_ns() - t_start,
        "workload": {"name": "madvise-loop"},
        "errors": {},
    }


def runner_trial_fn(probe_session: Any = None):
    """lab.trials.arm_trial's trial function: it seeds round r with spec.seed + r (the same for every
    arm of a round), so rounds differ in layout and arms of a round share one."""
    from lab.trials.arm_trial import trial_fn  # lazily: the runner brings the VMM and guest processes

    return trial_fn(probe_session)


TRIAL_FNS = {"madvise-loop": lambda: madvise_loop_trial, "runner": runner_trial_fn}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trial-fn", choices=sorted(TRIAL_FNS), default="madvise-loop")
    ap.add_argument("--repeats", type=int, default=20, help="A/A pairs to gate (default 20)")
    ap.add_argument("--spec", type=Path, default=None, help="TOML spec (flags below override it)")
    ap.add_argument("--trials", type=int, default=None, help="trials per arm (default: spec's, else 10)")
    ap.add_argument("--warmups", type=int, default=None)
    ap.add_argument("--guest-mib", type=int, default=None)
    ap.add_argument("--inflate-mib", type=int, default=None)
    ap.add_argument("--arms", default=None, help="comma-separated arms (default pfn,pfn-ranges)")
    ap.add_argument("--probes", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--threshold", action="append", default=[], metavar="METRIC=VALUE")
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--goal", type=float, default=0.05, help="acceptable false-positive rate")
    ap.add_argument("--mode", choices=("absolute", "relative", "both"), default="both",
                    help="gate rule(s) to evaluate on each A/A pair: absolute timings (the default gate) or "
                         "`gate --relative` (ratios to the reference arm); default both")
    ap.add_argument("--db", type=Path, default=None, help="keep the runs in this database (default: a temp file)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)

    overrides: dict[str, Any] = {"probes": args.probes, "name": f"gate-fp-{args.trial_fn}"}
    if args.spec is None:
        overrides.update({"guest_mib": 64, "inflate_mib": 16, "arms": ["pfn", "pfn-ranges"], "trials": 10,
                          "warmups": 1, "workload": "idle"})
    for key in ("trials", "warmups", "guest_mib", "inflate_mib", "arms"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        spec = load_spec(args.spec, overrides)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    th = Thresholds().add_cli(args.threshold)
    if args.alpha is not None:
        th.alpha = args.alpha
    try:
        session = None
        if args.probes and args.trial_fn == "runner":
            from lab.trials.probing import open_probes  # with probes on, compare's twin design applies
            session = open_probes(True)
        trial_fn = TRIAL_FNS[args.trial_fn](session) if session is not None else TRIAL_FNS[args.trial_fn]()
    except ImportError as e:
        print(f"error: --trial-fn {args.trial_fn} is not available: {e}", file=sys.stderr)
        return 2

    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="gate-fp-")
        db = Path(tmp.name) / "gate-fp.db"
    else:
        db = args.db
    modes = ["absolute", "relative"] if args.mode == "both" else [args.mode]
    flagged: dict[str, Counter[str]] = {m: Counter() for m in modes}
    positives = dict.fromkeys(modes, 0)
    t0 = time.monotonic()
    with Store(db) as store:
        for i in range(args.repeats):
            a = run_experiment(spec, trial_fn, store, progress=False)
            b = run_experiment(spec, trial_fn, store, progress=False)
            line = f"[{i + 1}/{args.repeats}] {a} vs {b}:"
            for mode in modes:
                try:
                    res = run_gate(load_input(a, db), load_input(b, db), th, relative=mode == "relative")
                except GateInputError as e:
                    print(f"error: gate cannot judge these runs: {e}", file=sys.stderr)
                    return 2
                regs = res.regressions
                positives[mode] += bool(regs)
                flagged[mode].update(f"{c.arm} {c.metric}" for c in regs)
                line += f" {mode} {res.verdict}" + "".join(f"\n    {mode}: {c.arm} {c.metric}: {c.message}"
                                                           for c in regs)
            print(line, file=sys.stderr)
    n = args.repeats
    results = {}
    for mode in modes:
        ci = sst.binomtest(positives[mode], n).proportion_ci(confidence_level=0.95, method="exact")
        results[mode] = {"false_positives": positives[mode], "rate": positives[mode] / n,
                         "rate_ci95": [ci.low, ci.high], "within_goal": positives[mode] / n <= args.goal,
                         "flagged_metrics": dict(flagged[mode].most_common())}
    summary = {"trial_fn": args.trial_fn, "repeats": n, "goal": args.goal, "modes": results,
               "spec": spec.to_dict(), "rule": th.describe(), "seconds": round(time.monotonic() - t0, 1)}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"A/A gate false-positive rate over {n} pairs (goal <= {args.goal:.0%}), rule: {th.describe()}")
        for mode, r in results.items():
            print(f"  {mode:<9} {r['false_positives']}/{n} = {r['rate']:.1%} (95% CI {r['rate_ci95'][0]:.1%}.."
                  f"{r['rate_ci95'][1]:.1%}): {'met' if r['within_goal'] else 'NOT met'}")
            for what, k in r["flagged_metrics"].items():
                print(f"      flagged {k}x: {what}")
        print(f"  spec: {spec.command_line()}")
        print(f"  {summary['seconds']} s")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all(r["within_goal"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
