"""Two checkouts of the lab, compared trial by trial, interleaved: did a change make a
protocol slower?

Separate runs of an experiment drift on a shared or long-lived machine (the kernel's
madvise time moved by ~15 % between two runs of identical code here, so a gate
between such runs failed its A/A). This benchmark interleaves instead: round r runs
every arm once with each checkout, the order alternating by round, the seed = r, so
drift hits both sides alike. It reports per arm the median of the per-pair ratios
B/A with a 95 % bootstrap CI and a Wilcoxon signed-rank p, and checks that the exact
counters (pages, discard calls) agree in every pair. Run it with A = B first (A/A):
only a design whose A/A passes says anything about A/B.

    python benchmarks/code_ab.py --a OLD_CHECKOUT --b NEW_CHECKOUT [--arms pfn,bitmap,chunks]
        [--rounds 8] [--guest-mib 2048 --inflate-mib 1792 --workload aged] [--probes]

Each trial is `balloon-lab run --json` of that checkout (its code on PYTHONPATH, this
interpreter), timed from the result's inflate total. Needs root, like every trial.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

RUN = "import sys; sys.argv[0] = 'balloon-lab'; from lab.cli import main; main()"


def trial(checkout: Path, arm: str, seed: int, a: argparse.Namespace) -> dict:
    """One `balloon-lab run` of `checkout`'s code; its inflate total and exact counters."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, "-c", RUN, "run", "--protocol", arm, "--guest-mib", str(a.guest_mib),
           "--inflate-mib", str(a.inflate_mib), "--workload", a.workload, "--seed", str(seed),
           "--probes" if a.probes else "--no-probes", "--json"]
    p = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"code_ab: {checkout} {arm} seed {seed}: trial failed:\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    return {"total_ns": r["stages_ns"]["inflate"]["total"], "pages": r["pages"], "discard_calls": r["discard_calls"]}


def paired(a_ms: np.ndarray, b_ms: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Median per-pair ratio b/a, its 95 % bootstrap CI, and the Wilcoxon signed-rank p."""
    ratio = b_ms / a_ms
    boot = np.median(rng.choice(ratio, (10_000, ratio.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(ratio)), float(lo), float(hi), float(stats.wilcoxon(b_ms, a_ms).pvalue)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="code_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B (may be A itself: the A/A)")
    ap.add_argument("--arms", default="pfn,bitmap,chunks")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--guest-mib", type=int, default=2048)
    ap.add_argument("--inflate-mib", type=int, default=1792)
    ap.add_argument("--workload", default="aged")
    ap.add_argument("--probes", action="store_true", help="probed trials (default: probes off, as timings are taken)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.rounds < 6:
        ap.error("--rounds must be at least 6 (a Wilcoxon test on fewer pairs cannot reach p < 0.05)")
    for c in (a.a, a.b):
        if not ((c / "lab" / "cli.py").is_file() or (c / "lab" / "cli" / "group.py").is_file()):
            ap.error(f"{c} is not a balloon-lab checkout (no lab/cli.py nor lab/cli/group.py)")
    arms = a.arms.split(",")
    got: dict[tuple[str, str, int], dict] = {}
    for r in range(1, a.rounds + 1):
        for arm in arms:
            order = (("A", a.a), ("B", a.b)) if r % 2 else (("B", a.b), ("A", a.a))
            for side, checkout in order:
                got[side, arm, r] = trial(checkout.resolve(), arm, r, a)
    rng = np.random.default_rng(0)
    report = {}
    for arm in arms:
        A = np.array([got["A", arm, r]["total_ns"] for r in range(1, a.rounds + 1)]) / 1e6
        B = np.array([got["B", arm, r]["total_ns"] for r in range(1, a.rounds + 1)]) / 1e6
        med, lo, hi, p = paired(A, B, rng)
        exact = all({k: got["A", arm, r][k] for k in ("pages", "discard_calls")}
                    == {k: got["B", arm, r][k] for k in ("pages", "discard_calls")} for r in range(1, a.rounds + 1))
        report[arm] = {"a_ms": float(np.median(A)), "b_ms": float(np.median(B)), "ratio": med, "ci": [lo, hi],
                       "wilcoxon_p": p, "pairs": a.rounds, "counters_equal": exact}
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"inflate total, {a.rounds} interleaved pairs per arm, probes {'on' if a.probes else 'off'}")
        for arm, v in report.items():
            print(f"  {arm:8} A {v['a_ms']:8.1f} ms  B {v['b_ms']:8.1f} ms  B/A per pair {v['ratio']:.3f} "
                  f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]  Wilcoxon p={v['wilcoxon_p']:.3f}  "
                  f"counters equal: {v['counters_equal']}")
    return 0 if all(v["counters_equal"] for v in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
