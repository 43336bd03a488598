"""The fuzzing loop: workers, the process pool, replay of saved cases.

Guidance is behavioural: a case whose outcome signature (the set of refusal reasons,
NEEDS_RESET, whether anything was discarded, ...) was never seen joins the pool that
mutations start from. Each worker process runs its share of the execs with its own
seed (seed * 1000 + worker), so the same seed and worker count repeat a run; found
failures and one case per behaviour can be written out as JSON (fuzz/corpus.py).
"""
from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from fuzz.cases import LAYOUTS, Outcome
from fuzz.corpus import case_to_json
from fuzz.targets import FAMILIES, GENERATORS, MUTATORS, WorkerState, execute
from fuzz.time_limit import hang_timer


def replay(cases: list[dict], limit_s: float = 5.0) -> list[tuple[dict, Outcome]]:
    """Run saved cases once each; returns those that fail."""
    state = WorkerState()
    quiet()
    try:
        bad = []
        with hang_timer():
            for c in cases:
                o = execute(state, c, limit_s)
                if o.failure:
                    bad.append((c, o))
        return bad
    finally:
        state.close()


def quiet() -> None:
    """Silence the device's refusal log: the counters are the record here."""
    # a million refusals would be a million log lines; the counters are the record here
    logging.getLogger("balloon-lab").setLevel(logging.CRITICAL + 1)


@dataclass
class FuzzResult:
    execs: int = 0
    crashes: int = 0
    hangs: int = 0
    oob_discards: int = 0
    slow_wakeups: int = 0        # executions with a wake-up over the 50 ms CPU bound (fuzz/wakeups.py)
    seconds: float = 0.0
    workers: int = 1
    seed: int = 0
    by_target: dict = field(default_factory=dict)
    signatures: int = 0
    volatile_execs: int = 0      # device execs whose oracle had to allow every page (see oracle.Bound)
    max_exec_ms: float = 0.0
    failures: list = field(default_factory=list)       # [{"kind", "detail", "case"}], at most MAX_FAILURES
    slow_by_what: dict = field(default_factory=dict)   # slow wake-ups by what they served: {what: [count, worst ms]}
    seen: list = field(default_factory=list, repr=False)   # behaviour signatures, merged over workers
    corpus: list = field(default_factory=list)         # one JSON case per behaviour seen

    def to_json(self, with_corpus: bool = False) -> dict:
        d = asdict(self)
        d.pop("seen")
        if not with_corpus:
            d.pop("corpus")
        d["execs_per_s"] = round(self.execs / self.seconds, 1) if self.seconds else 0.0
        return d


MAX_FAILURES = 200
GC_EVERY = 2000          # execs between the worker's own full garbage collections (see fuzz_worker)


def _what(detail: str) -> str:
    """What a slow wake-up served, without its step number: 'kick on queue 0'."""
    inner = detail.rsplit("(", 1)[-1].rstrip(")")
    return inner.split(": ", 1)[-1] if inner.startswith("step ") else inner


def fuzz_worker(execs: int, seed: int, limit_s: float, counter=None, keep_corpus: bool = False,
                family: str = "rings") -> FuzzResult:
    """One process's share of the run."""
    rng = random.Random(seed)
    state = WorkerState()
    targets, weights = FAMILIES[family]
    for name in LAYOUTS if family == "rings" else ():   # create and fill guest RAM before anything is timed
        state.devices.ram(name)
    quiet()
    # The worker's heap (pools, behaviours seen: tens of thousands of objects) is far larger
    # than a VMM's; a full collection of it inside a timed wake-up would be the fuzzer's
    # cost, not the device's. So it is collected between execs, and what survives is frozen
    # (gc.freeze: never scanned again); a collection inside a wake-up then only sees the
    # exec's own young objects, as in the VMM.
    gc.collect()
    gc.freeze()
    timer = hang_timer().__enter__()
    res = FuzzResult(seed=seed)
    pools: dict[str, list[dict]] = {t: [] for t in targets}
    seen: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    by_t: Counter[str] = Counter()
    try:
        for i in range(execs):
            if i % GC_EVERY == GC_EVERY - 1:
                gc.collect()
                gc.freeze()
            t = rng.choices(targets, weights)[0]
            pool = pools[t]
            if pool and rng.random() < 0.75:
                case = MUTATORS[t](rng.choice(pool), rng, pool)
            else:
                case = GENERATORS[t](rng)
            e0 = time.perf_counter()
            o = execute(state, case, limit_s)
            ms = (time.perf_counter() - e0) * 1e3
            if ms > res.max_exec_ms:
                res.max_exec_ms = ms
            by_t[t] += 1
            if o.failure:
                if o.failure == "hang":
                    res.hangs += 1
                elif o.failure == "oob-discard":
                    res.oob_discards += 1
                elif o.failure == "slow-wakeup":
                    res.slow_wakeups += 1
                    ms = float(o.detail.split(" used ", 1)[1].split(" ms", 1)[0])
                    seen_what = res.slow_by_what.setdefault(f"{t}: {_what(o.detail)}", [0, 0.0])
                    seen_what[0] += 1
                    seen_what[1] = max(seen_what[1], ms)
                else:
                    res.crashes += 1
                if len(res.failures) < MAX_FAILURES:
                    res.failures.append({"kind": o.failure, "detail": o.detail, "case": case_to_json(case)})
            elif o.signature not in seen:
                seen[o.signature] = case
                pool.append(case)
                if len(pool) > 400:
                    pool.pop(rng.randrange(len(pool)))
            if counter is not None and i % 256 == 255:
                with counter.get_lock():
                    counter.value += 256
        if counter is not None:
            with counter.get_lock():
                counter.value += execs % 256
    finally:
        timer.__exit__()
        state.close()
    res.execs = execs
    res.volatile_execs = state.volatile
    res.seconds = time.perf_counter() - t0
    res.by_target = dict(by_t)
    res.signatures = len(seen)
    res.seen = [repr(s) for s in seen]
    if keep_corpus:
        res.corpus = [dict(case_to_json(c), signature=repr(s)) for s, c in seen.items()]
    return res


def _worker_entry(args):
    execs, seed, limit_s, keep, family = args
    return fuzz_worker(execs, seed, limit_s, _COUNTER, keep, family)


_COUNTER = None


def _init_worker(counter) -> None:
    """A pool worker: the parent alone answers Ctrl-C and SIGTERM (it ends the pool, whose
    SIGTERM then ends the worker quietly, not with the parent's handler inherited by fork)."""
    global _COUNTER
    _COUNTER = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_fuzz(execs: int, *, seed: int = 0, workers: int | None = None, exec_timeout_s: float = 2.0,
             keep_corpus: bool = False, progress: Callable[[int, float], None] | None = None,
             family: str = "rings") -> FuzzResult:
    """Run `execs` executions split over `workers` processes (default: one per CPU) of the
    targets of `family` (FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown fuzz target {family!r}; choose from {', '.join(FAMILIES)}")
    workers = max(1, min(workers or os.cpu_count() or 1, execs or 1))
    shares = [execs // workers + (1 if k < execs % workers else 0) for k in range(workers)]
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.map_async(_worker_entry, [(n, seed * 1000 + k, exec_timeout_s, keep_corpus, family)
                                                 for k, n in enumerate(shares)])
        while not pending.ready():
            pending.wait(5.0)
            if progress is not None:
                progress(counter.value, time.perf_counter() - t0)
        parts = pending.get()
    total = FuzzResult(seed=seed, workers=workers)
    by_t: Counter[str] = Counter()
    sigs: set[str] = set()
    kept: set[str] = set()
    for r in parts:
        total.execs += r.execs
        total.crashes += r.crashes
        total.hangs += r.hangs
        total.oob_discards += r.oob_discards
        total.volatile_execs += r.volatile_execs
        total.slow_wakeups += r.slow_wakeups
        for what, (n, ms) in r.slow_by_what.items():
            agg = total.slow_by_what.setdefault(what, [0, 0.0])
            agg[0] += n
            agg[1] = max(agg[1], ms)
        total.max_exec_ms = max(total.max_exec_ms, r.max_exec_ms)
        total.failures += r.failures
        by_t.update(r.by_target)
        sigs.update(r.seen)
        for c in r.corpus:
            if c["signature"] not in kept:
                kept.add(c["signature"])
                total.corpus.append(c)
    total.failures = total.failures[:MAX_FAILURES]
    total.by_target = dict(by_t)
    total.signatures = len(sigs)
    total.seconds = time.perf_counter() - t0
    total.max_exec_ms = round(total.max_exec_ms, 2)
    total.seconds = round(total.seconds, 2)
    return total
