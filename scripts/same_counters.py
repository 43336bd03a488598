"""Are two stored runs' counters the same, arm by arm and round by round? A refactoring
that claims "behaviour unchanged" shows it with this: the same experiment run on the
old code and on the new, every counter metric (the store's kind "counter": pages,
requests, kicks, discard calls, ... exact by design for a given seed) of every arm and
round equal, warm-ups included.

    python scripts/same_counters.py A.db[:RUN] B.db[:RUN] [--histograms]

Histograms are not counters (the probes' latency buckets and the kernel's page
allocations vary from run to run, and between the rounds of one run); --histograms
compares their buckets too.

RUN is a run id, a unique prefix or "latest" (the default). Prints how many values were
compared and every difference; exits 1 if any differs or a side lacks what the other has.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.store.store import Store  # noqa: E402


def counters(target: str, histograms: bool = False) -> tuple[str, dict[tuple, float]]:
    """(run id, {(arm, round, warmup, metric): value}) of the counter metrics (and with
    `histograms`, the histogram buckets) of one stored run's ok trials."""
    path, _, ref = target.partition(":")
    with Store(path, create=False) as s:
        run = s.resolve_run_id(ref or "latest")
        out: dict[tuple, float] = {}
        for idx, arm, rnd, warmup, status, metric, kind, value in s.metric_rows(run):
            if status == "ok" and kind == "counter":
                out[(arm, rnd, bool(warmup), metric)] = value
        rows = [] if not histograms else s.db.execute("SELECT t.arm, t.round, t.warmup, h.name, h.bucket, h.count FROM histograms h "
                            "JOIN trials t ON t.id = h.trial_id WHERE t.run_id=? AND t.status='ok'", (run,))
        for arm, rnd, warmup, name, bucket, count in rows:
            out[(arm, rnd, bool(warmup), f"{name}[{bucket}]")] = count
    return run, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="same_counters", description=__doc__.splitlines()[0])
    ap.add_argument("a", help="DB[:RUN], the old code's run")
    ap.add_argument("b", help="DB[:RUN], the new code's run")
    ap.add_argument("--histograms", action="store_true", help="compare the histograms' buckets too")
    a = ap.parse_args(argv)
    run_a, ca = counters(a.a, a.histograms)
    run_b, cb = counters(a.b, a.histograms)
    only_a, only_b = sorted(set(ca) - set(cb)), sorted(set(cb) - set(ca))
    differ = sorted(k for k in set(ca) & set(cb) if ca[k] != cb[k])
    arms = sorted({k[0] for k in ca})
    rounds = sorted({(k[1], k[2]) for k in ca})
    metrics = sorted({k[3] for k in ca if "[" not in k[3]})
    print(f"A {a.a} (run {run_a}) vs B {a.b} (run {run_b}): {len(set(ca) & set(cb))} values compared: "
          f"{len(arms)} arms x {len(rounds)} rounds (warm-ups included) x {len(metrics)} counter metrics"
          + (" and the histograms' buckets" if a.histograms else ""))
    for k in differ[:50]:
        print(f"  DIFFERS  {k}: A {ca[k]}  B {cb[k]}")
    for k in only_a[:20]:
        print(f"  only in A  {k}")
    for k in only_b[:20]:
        print(f"  only in B  {k}")
    same = not (differ or only_a or only_b)
    print("same counters: yes" if same else
          f"same counters: NO ({len(differ)} differ, {len(only_a)} only in A, {len(only_b)} only in B)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
