"""The fuzzing loop: workers, the process pool, replay of saved cases.

Guidance is behavioural: a case whose outcome signature (the set of refusal reasons,
NEEDS_RESET, whether anything was discarded, ...) was never seen joins the pool that
mutations start from. Each worker process runs its share of the execs with its own
seed (seed * 1000 + worker), so the same seed and worker count repeat a run; found
failures and one case per behaviour can be written out as JSON (fuzz/corpus.py).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
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
    seconds: float = 0.0
    workers: int = 1
    seed: int = 0
    by_target: dict = field(default_factory=dict)
    signatures: int = 0
    volatile_execs: int = 0      # device execs whose oracle had to allow every page (see oracle.Bound)
    timing_retries: int = 0      # control/migration execs re-run because one wake-up looked slow
    max_exec_ms: float = 0.0
    failures: list = field(default_factory=list)       # [{"kind", "detail", "case"}], at most 50
    seen: list = field(default_factory=list, repr=False)   # behaviour signatures, merged over workers
    corpus: list = field(default_factory=list)         # one JSON case per behaviour seen

    def to_json(self, with_corpus: bool = False) -> dict:
        d = asdict(self)
        d.pop("seen")
        if not with_corpus:
            d.pop("corpus")
        d["execs_per_s"] = round(self.execs / self.seconds, 1) if self.seconds else 0.0
        return d


def fuzz_worker(execs: int, seed: int, limit_s: float, counter=None, keep_corpus: bool = False,
                family: str = "rings") -> FuzzResult:
    """One process's share of the run."""
    rng = random.Random(seed)
    state = WorkerState()
    targets, weights = FAMILIES[family]
    for name in LAYOUTS if family == "rings" else ():   # create and fill guest RAM before anything is timed
        state.devices.ram(name)
    quiet()
    timer = hang_timer().__enter__()
    res = FuzzResult(seed=seed)
    pools: dict[str, list[dict]] = {t: [] for t in targets}
    seen: dict[tuple, dict] = {}
    t0 = time.perf_counter()
    by_t: Counter[str] = Counter()
    try:
        for i in range(execs):
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
                else:
                    res.crashes += 1
                if len(res.failures) < 50:
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
    res.timing_retries = state.timing_retries
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
    global _COUNTER
    _COUNTER = counter


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
        total.timing_retries += r.timing_retries
        total.max_exec_ms = max(total.max_exec_ms, r.max_exec_ms)
        total.failures += r.failures
        by_t.update(r.by_target)
        sigs.update(r.seen)
        for c in r.corpus:
            if c["signature"] not in kept:
                kept.add(c["signature"])
                total.corpus.append(c)
    total.failures = total.failures[:50]
    total.by_target = dict(by_t)
    total.signatures = len(sigs)
    total.seconds = time.perf_counter() - t0
    total.max_exec_ms = round(total.max_exec_ms, 2)
    total.seconds = round(total.seconds, 2)
    return total
