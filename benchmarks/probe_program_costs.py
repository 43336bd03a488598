"""Each probe program's own cost in one inflate, for two checkouts of the lab, interleaved:
the per-program table before and after a change to the probes.

    python benchmarks/probe_program_costs.py --a OLD_CHECKOUT --b NEW_CHECKOUT \
        [--arms pfn,bitmap] [--rounds 3] [--guest-mib 2048 --inflate-mib 1792 --workload aged]

Each trial runs in a child process with that checkout's code first on sys.path (its
ProbeSession, its BPF programs, its runner), with the kernel's run-time statistics on
(probes/bpf_stats.py of THIS checkout, loaded by path: the old one may have none) and
run_cnt/run_time_ns of every program of the session read at the start and the end of
the inflate, by wrapping the session's clear() and read() (the runner calls them
around each operation). So both checkouts are measured the same way, whatever their own
code reports. The table is per program: runs (every process: the kernel keeps one total
per program), ns per run and ms, medians over the rounds; and the inflate's total.
Rounds alternate the order of the two checkouts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("bpf_stats_here", sys.argv[1])
bs = importlib.util.module_from_spec(spec); sys.modules[spec.name] = bs; spec.loader.exec_module(bs)
try:                                   # the lab in rooms, or before (lab/runner.py)
    from lab.trials.model.balloon_trial import BalloonTrial
    from lab.trials.model.runner import run_balloon
except ImportError:
    from lab.runner import BalloonTrial, run_balloon
from probes.session import ProbeSession
arm, guest, inflate, workload, seed = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
s = ProbeSession()
s.load()
windows = []
def stats():
    out = {}
    for fn, f in s.module.bpf.funcs.items():
        st = bs.prog_stats(f.fd)
        out[fn.decode()] = (st.run_cnt, st.run_time_ns)
    return out
clear, read = s.clear, s.read
def clear_():
    clear(); windows.append([stats(), None])
def read_():
    windows[-1][1] = stats(); return read()
s.clear, s.read = clear_, read_
with bs.stats_enabled():
    r = run_balloon(BalloonTrial(protocol=arm, guest_mib=guest, inflate_mib=inflate, workload=workload, seed=seed,
                                 deflate=False), s)
s.detach()
a, b = windows[0]
progs = {n: {"runs": b[n][0] - a[n][0], "ns": b[n][1] - a[n][1]} for n in b if n in a}
print(json.dumps({"programs": progs, "inflate_ms": r["stages_ns"]["inflate"]["total"] / 1e6,
                  "madvise_calls": r["discard_calls"], "verified": r["verified"]}))
"""


def trial(checkout: Path, arm: str, seed: int, a: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    p = subprocess.run([sys.executable, "-c", CHILD, str(HERE / "probes" / "bpf_stats.py"), arm, str(a.guest_mib),
                        str(a.inflate_mib), a.workload, str(seed)], cwd=checkout, env=env, capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"probe_program_costs: {checkout} {arm}: trial failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def short(name: str) -> str:
    for prefix in ("raw_tracepoint__", "tracepoint__"):
        if name.startswith(prefix):
            return name[len(prefix):].replace("__", ":")
    return name


def table(results: list[dict]) -> list[str]:
    names = sorted({n for r in results for n in r["programs"]})
    rows = []
    for n in names:
        runs = statistics.median(r["programs"].get(n, {"runs": 0})["runs"] for r in results)
        ms = statistics.median(r["programs"].get(n, {"ns": 0})["ns"] / 1e6 for r in results)
        rows.append((short(n), runs, 1e6 * ms / runs if runs else 0.0, ms))
    total = statistics.median(sum(p["ns"] for p in r["programs"].values()) / 1e6 for r in results)
    inflate = statistics.median(r["inflate_ms"] for r in results)
    out = [f"  {'program':<34}{'runs':>12}{'ns/run':>9}{'ms':>9}"]
    out += [f"  {n:<34}{runs:>12,.0f}{ns:>9.0f}{ms:>9.1f}".replace(",", " ") for n, runs, ns, ms in rows]
    out.append(f"  {'total (median of the sums)':<34}{'':>12}{'':>9}{total:>9.1f}"
               f"   = {100 * total / inflate:.1f} % of the probed inflate ({inflate:.0f} ms, median)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="probe_program_costs", description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (before)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B (after)")
    ap.add_argument("--arms", default="pfn,bitmap")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guest-mib", type=int, default=2048)
    ap.add_argument("--inflate-mib", type=float, default=1792)
    ap.add_argument("--workload", default="aged")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(1, a.rounds + 1):
        for arm in a.arms.split(","):
            order = (("A", a.a), ("B", a.b)) if r % 2 else (("B", a.b), ("A", a.a))
            for side, checkout in order:
                got.setdefault((side, arm), []).append(trial(checkout.resolve(), arm, r, a))
    if a.json:
        print(json.dumps({f"{s}:{arm}": v for (s, arm), v in got.items()}))
        return 0
    load = os.getloadavg()
    print(f"per-program cost of one inflate ({a.guest_mib}/{a.inflate_mib:g} MiB {a.workload}), bpf_stats, "
          f"medians of {a.rounds} rounds; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for arm in a.arms.split(","):
        for side, checkout in (("A", a.a), ("B", a.b)):
            print(f"\n{arm}, {side} = {checkout}:")
            print("\n".join(table(got[side, arm])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
