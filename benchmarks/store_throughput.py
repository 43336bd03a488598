#!/usr/bin/env python3
"""Throughput of the results store: N writer processes store trials concurrently into
one run, each trial in its own transaction (its row, ~60 metrics, its histograms), as
workers on many hosts do. Then every trial is counted back: none may be lost.

    .venv/bin/python benchmarks/store_throughput.py --writers 8 --trials 1000
    .venv/bin/python benchmarks/store_throughput.py --db postgresql://... --writers 8 --trials 1000
    .venv/bin/python benchmarks/store_throughput.py --db out/t.db            # SQLite, for comparison

Without --db a private PostgreSQL server is started in a temporary directory (durable:
fsync on, as a real store) and removed at the end. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.results import metrics  # noqa: E402
from lab.machine.environment import loadavg  # noqa: E402
from lab.trials.spec import ExperimentSpec  # noqa: E402
from lab.store.store import Store, TrialRecord, now_iso  # noqa: E402


def sample_result(i: int) -> dict[str, Any]:
    """A result shaped like the runner's (stages, counters, a run-length histogram)."""
    stages = {k: 1_000_000 + 97 * i + j for j, k in enumerate(("alloc", "encode", "transmit", "translate",
                                                                 "discard", "total"))}
    return {"protocol": "pfn", "verified": True, "pages": 65536, "requests": 256, "kicks": 256 + i % 3,
            "discard_calls": 65536, "runs": 40 + i % 5, "translations": 65536,
            "stages_ns": {"inflate": stages, "deflate": dict(stages)},
            "run_length_hist": {"1": 3 + i % 4, "8": 20, "512": 17}, "rss_bytes": {"vmm": 300 << 20}}


def _writer(target: str, run_id: str, first: int, count: int, arms: list[str], out: "mp.Queue") -> None:
    with Store(target) as store:
        t0 = time.perf_counter()
        for i in range(first, first + count):
            store.add_trial(run_id, TrialRecord(arm=arms[i % len(arms)], idx=i, round=i // len(arms), warmup=False,
                                                status="ok", started_at=now_iso(), duration_s=0.01,
                                                result=sample_result(i)))
        out.put(time.perf_counter() - t0)


def write_concurrently(target: str, writers: int, trials: int) -> dict[str, Any]:
    """Store `trials` trials from `writers` processes into a new run of `target`; count them back."""
    arms = ["pfn", "chunks"]
    with Store(target) as store:
        run_id = store.create_run(ExperimentSpec(name="store-throughput", arms=arms, trials=trials // 2,
                                                 warmups=0, probes=False), "balloon", {})
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    share = [trials // writers + (w < trials % writers) for w in range(writers)]
    starts = [sum(share[:w]) for w in range(writers)]
    procs = [ctx.Process(target=_writer, args=(target, run_id, starts[w], share[w], arms, q)) for w in range(writers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"writer exit codes {[p.exitcode for p in procs]}")
    per_writer = sorted(q.get() for _ in procs)
    n_metrics = len(metrics.flatten(sample_result(0))[0])
    with Store(target) as store:
        stored = store.trial_count(run_id)
        idxs = [t.idx for t in store.trials(run_id)]
        metric_rows = int(store.db.execute("SELECT count(*) FROM metrics m JOIN trials t ON t.id = m.trial_id"
                                           " WHERE t.run_id=?", (run_id,)).fetchone()[0])
        store.finish_run(run_id, "complete")
    return {"store": store.dialect.name, "writers": writers, "trials_written": trials, "trials_stored": stored,
            "lost": trials - stored, "idx_complete": sorted(idxs) == list(range(trials)),
            "metric_rows": metric_rows, "metric_rows_expected": trials * n_metrics,
            "wall_s": round(wall, 3), "trials_per_s": round(trials / wall, 1),
            "writer_s": [round(x, 3) for x in per_writer], "loadavg": loadavg(), "run_id": run_id}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default=None, help="store to write into (default: a private PostgreSQL server)")
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--trials", type=int, default=1000)
    a = ap.parse_args()
    if a.db:
        res = write_concurrently(a.db, a.writers, a.trials)
    else:
        from lab.store import pg_local
        with pg_local.start(durable=True) as server:
            res = write_concurrently(server.url, a.writers, a.trials)
            res["server"] = "private PostgreSQL (fsync on)"
    print(json.dumps(res))
    return 0 if res["lost"] == 0 and res["idx_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
