"""Did a change of the lab's code change what the protocols do? Every counter of two runs, trial by trial.

Counters (metrics declared with kind "counter": pages, requests, discard calls, runs,
translations, bytes on the ring, ...) are fixed by the protocol and the seed, so two
runs of the same experiment by two checkouts must agree on every one of them, in every
arm and round (warm-ups included), whatever the machine's load. Gauges that depend on
scheduling (kicks under EVENT_IDX, interrupts, device wake-ups, budget yields) cannot
agree trial by trial; their per-arm medians and ranges are printed side by side.

    python benchmarks/counter_equality.py BEFORE.db[:RUN] AFTER.db[:RUN]

Exit status 0 when every counter both runs have agrees (metrics only one run has are
listed, not failed: a new counter is not a changed one).
"""
from __future__ import annotations

import sqlite3
import sys
from collections import defaultdict

import numpy as np

GAUGES_SHOWN = ("kicks", "interrupts", "device_wakeups", "device_calls", "budget_yields", "deflate.kicks",
                "deflate.interrupts")


def load(ref: str) -> tuple[str, dict]:
    """{(arm, round, warmup): {metric: (kind, value)}} of one run (the newest if not named)."""
    path, _, run = ref.partition(":")
    db = sqlite3.connect(path)
    if not run:
        run = db.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()[0]
    out: dict = defaultdict(dict)
    q = ("SELECT t.arm, t.round, t.warmup, m.name, m.kind, m.value FROM metrics m JOIN trials t ON t.id = m.trial_id "
         "WHERE t.run_id = ? AND t.status = 'ok'")
    for arm, rnd, warm, name, kind, value in db.execute(q, (run,)):
        out[arm, rnd, warm][name] = (kind, value)
    return run, out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python benchmarks/counter_equality.py BEFORE.db[:RUN] AFTER.db[:RUN]", file=sys.stderr)
        return 2
    (run_a, a), (run_b, b) = load(argv[0]), load(argv[1])
    trials = sorted(set(a) & set(b))
    print(f"before {argv[0]} run {run_a}, after {argv[1]} run {run_b}: {len(trials)} trials in both "
          f"(only before: {len(set(a) - set(b))}, only after: {len(set(b) - set(a))})")
    compared, differ, only = 0, [], defaultdict(set)
    for key in trials:
        ma, mb = a[key], b[key]
        for name in set(ma) | set(mb):
            if name not in mb or name not in ma:
                only["before" if name in ma else "after"].add(name)
                continue
            if ma[name][0] != "counter":
                continue
            compared += 1
            if ma[name][1] != mb[name][1]:
                differ.append((key, name, ma[name][1], mb[name][1]))
    print(f"counters compared: {compared} values; differing: {len(differ)}")
    for key, name, va, vb in differ[:20]:
        print(f"  DIFFERS {key[0]} round {key[1]}{' warm-up' if key[2] else ''}: {name} {va} -> {vb}")
    for side, names in only.items():
        print(f"metrics only {side}: {', '.join(sorted(names))}")
    print("scheduling-dependent gauges, per arm (median [min, max] over measured trials), before -> after:")
    for arm in sorted({k[0] for k in trials}):
        cells = []
        for g in GAUGES_SHOWN:
            va = [a[k][g][1] for k in trials if k[0] == arm and not k[2] and g in a[k]]
            vb = [b[k][g][1] for k in trials if k[0] == arm and not k[2] and g in b[k]]
            if va and vb:
                cells.append(f"{g} {np.median(va):.0f} [{min(va):.0f}, {max(va):.0f}] -> "
                             f"{np.median(vb):.0f} [{min(vb):.0f}, {max(vb):.0f}]")
        print(f"  {arm}: " + "; ".join(cells))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
