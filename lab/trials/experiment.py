"""The experiment loop: run a spec's arms interleaved, trial by trial, into the store.

Arms are interleaved (round 0: A B C, round 1: A B C, ...) so slow drift of the
machine (thermal state, page cache, a neighbour's load) hits every arm alike instead
of biasing whichever arm ran last. Warm-up rounds come first and are recorded but
kept out of the statistics. A trial that raises, or whose result is not verified,
is recorded as failed with its error; a trial is never half-written (see store.py),
and Ctrl-C or SIGTERM marks the run interrupted and raises ExperimentInterrupted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping

from system.signals import signals_deferred
from lab.machine import environment
from lab.results import metrics
from lab.analysis import stats
from lab.results import trial_result
from lab.trials import interrupts
from lab.trials.interrupts import Interrupted
from lab.trials.backends import backend_environment
from lab.store.db_path import next_command
from lab.trials.spec import ArmPlan, ExperimentSpec
from lab.store.store import Store, StoreError, TrialRecord, dumps, now_iso

# trial_fn(spec, arm, round) -> result dict. `round` is the same for every arm of a
# round (warm-up rounds first), so a runner seeding its workload with spec.seed + round
# gives every arm the same guest layout in that round.
TrialFn = Callable[[ExperimentSpec, str, int], Mapping[str, Any]]
MAX_CONSECUTIVE_FAILURES = 5


class ExperimentInterrupted(Interrupted):
    """Ctrl-C or SIGTERM during a run; the run is already marked interrupted."""

    def __init__(self, run_id: str, signum: int, kept: int | None = None) -> None:
        super().__init__(signum, f"run {run_id} interrupted by {signal.Signals(signum).name}"
                         + (f"; its {kept} completed trial(s) are kept" if kept is not None else ""))
        self.run_id = run_id


def check_result(result: Any) -> str | None:
    """Why a trial's result cannot count as ok, or None if it can."""
    if not isinstance(result, Mapping):
        return f"trial function returned {type(result).__name__}, not a result dict"
    if result.get("verified") is not True:
        errors = {k: v for k, v in (result.get("errors") or {}).items() if v} if isinstance(
            result.get("errors"), Mapping) else result.get("errors")
        return f"result not verified (verified={result.get('verified')!r}" + (
            f", errors={errors}" if errors else "") + ")"
    try:
        dumps(result)
    except (TypeError, ValueError) as e:
        return f"result cannot be stored: {e}"
    try:
        metrics.check_declared(result)
    except metrics.UndeclaredMetric as e:
        return f"result cannot be stored: {e}"
    return None


class _Progress:
    """Progress lines on stderr: trial i/N, arm, outcome, elapsed, ETA."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.t0, self.done = enabled, total, time.monotonic(), 0

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def trial(self, rec: TrialRecord, rounds: int, warmups: int) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        what = "warm-up" if rec.warmup else f"round {rec.round - warmups + 1}/{rounds - warmups}"
        line = (f"[{self.done:>{len(str(self.total))}}/{self.total}] {what:<14} {rec.arm:<18} "
                f"{rec.status:<6} {rec.duration_s:7.2f} s  elapsed {_hms(elapsed)}  ETA {_hms(eta)}")
        if rec.error:
            line += "\n    error: " + rec.error.splitlines()[0]
        self.say(line)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_experiment(spec: ExperimentSpec, trial_fn: TrialFn, store: Store, *, progress: bool = True,
                   probe_session: Any = None, env: Mapping[str, Any] | None = None, notes: str | None = None,
                   max_consecutive_failures: int | None = MAX_CONSECUTIVE_FAILURES) -> str:
    """Run every trial of `spec` through trial_fn, record it, compare the arms at the
    end (spec.arms[0] is the baseline) and return the run id.

    probe_session is only consulted for its `backend` attribute (recorded with the run);
    the backend each result reports in result["probes"]["backend"] wins once known.
    The run ends "complete" when every trial was attempted (even if some failed),
    "failed" when no measured trial succeeded or max_consecutive_failures were hit.
    """
    backend = getattr(probe_session, "backend", None) or (None if spec.probes else "none")
    run_env = dict(env) if env is not None else environment.collect(probe_backend=backend)
    run_env.update(backend_environment(spec.arms))
    run_id = store.create_run(spec, spec.kind, run_env, notes=notes)
    plans = spec.schedule()
    rounds = spec.warmups + spec.trials
    prog = _Progress(progress, rounds * len(plans))
    prog.say(f"run {run_id}: {spec.name}, {len(plans)} arm(s) x ({spec.warmups} warm-up + {spec.trials} trials) "
             f"= {prog.total} trials, database {store.path}")
    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = interrupts.install() if in_main else {}
    try:
        status = _run_rounds(spec, plans, trial_fn, store, run_id, rounds, prog, backend, max_consecutive_failures)
        store.finish_run(run_id, status)
    except KeyboardInterrupt as e:   # SIGINT or SIGTERM (lab/trials/interrupts.py)
        with signals_deferred():     # a second Ctrl-C must not cut the marking short
            store.finish_run(run_id, "interrupted")
            kept = store.trial_count(run_id)
        raise ExperimentInterrupted(run_id, interrupts.signum_of(e), kept) from None
    except StoreError as e:          # the store cannot take more (a full disk): keep what it holds
        raise _store_gave_out(store, run_id, e) from None
    finally:
        interrupts.restore(old_handlers)
    analyse_run(store, run_id, baseline_arm=plans[0].label)
    prog.say(f"run {run_id} {status}: `{next_command('show', run_id, db=store.path)}` for the comparison")
    return run_id


def _store_gave_out(store: Store, run_id: str, err: StoreError) -> StoreError:
    """The run's one-line error when its store stopped taking writes mid-run: the trials
    stored before stay (each was one transaction), the run is marked failed if the store
    still takes that much (otherwise `runs` shows it interrupted: its process is gone)."""
    kept = ""
    with contextlib.suppress(StoreError):
        kept = f" ({store.trial_count(run_id)} trials of this run stored: `balloon-lab show {run_id}`)"
    with contextlib.suppress(StoreError):
        store.finish_run(run_id, "failed")
    return StoreError(f"run {run_id} stopped: {err}{kept}")


def _run_rounds(spec: ExperimentSpec, plans: list[ArmPlan], trial_fn: TrialFn, store: Store, run_id: str,
                rounds: int, prog: _Progress, backend: str | None, max_fail: int | None) -> str:
    specs = {p.label: spec if p.probes == spec.probes else dataclasses.replace(spec, probes=False,
                                                                               probe_overhead=False)
             for p in plans}
    idx = ok_measured = consecutive = 0
    for rnd in range(rounds):
        for plan in plans:
            rec = _one_trial(specs[plan.label], plan, trial_fn, rnd, idx, warmup=rnd < spec.warmups)
            store.add_trial(run_id, rec)
            idx += 1
            prog.trial(rec, rounds, spec.warmups)
            if rec.status == "ok":
                consecutive = 0
                ok_measured += not rec.warmup
                reported = (rec.result.get("probes") or {}).get("backend") if isinstance(
                    rec.result.get("probes"), Mapping) else None
                if reported and reported != backend:
                    backend = reported
                    store.set_probe_backend(run_id, reported)
            else:
                consecutive += 1
                if max_fail and consecutive >= max_fail:
                    note = f"stopped after {consecutive} consecutive failed trials; last error: " + (
                        rec.error or "").splitlines()[0]
                    store.add_note(run_id, note)
                    prog.say(note)
                    return "failed"
    return "complete" if ok_measured else "failed"


def _one_trial(spec: ExperimentSpec, plan: ArmPlan, trial_fn: TrialFn, rnd: int, idx: int,
               warmup: bool) -> TrialRecord:
    started = now_iso()
    load = environment.load_snapshot()
    t0 = time.perf_counter()
    result: Any = None
    try:
        result = trial_result.to_json(trial_fn(spec, plan.arm, rnd))   # a TrialResult is stored as its JSON
        if isinstance(result, dict):
            result = {**result, "host_load": {"start": load, "end": environment.load_snapshot()}}
        error = check_result(result)
    except Exception as e:  # a failed trial is data, not a crash of the experiment
        error = "".join(traceback.format_exception_only(e)).strip() + "\n\n" + traceback.format_exc()
    duration = time.perf_counter() - t0
    return TrialRecord(arm=plan.label, idx=idx, round=rnd, warmup=warmup, status="ok" if error is None else "failed",
                       started_at=started, duration_s=duration, result=dict(result) if _storable(result) else None,
                       error=error)


def _storable(result: Any) -> bool:
    if not isinstance(result, Mapping):
        return False
    try:
        dumps(result)
        return True
    except (TypeError, ValueError):
        return False


def analyse_run(store: Store, run_id: str, *, baseline_arm: str | None = None, save: bool = True) -> stats.Comparison | None:
    """Compare the run's arms (baseline: the first scheduled arm) and store the result.
    None when the baseline arm has no measured ok trial."""
    table = store.metric_table(run_id)
    if baseline_arm is None:
        arms = store.get_run(run_id).arms
        baseline_arm = arms[0] if arms else next(iter(table), None)
    if baseline_arm is None or baseline_arm not in table:
        return None
    comp = stats.compare_arms(table, baseline_arm)
    if save:
        store.save_comparison(run_id, comp)
    return comp


def load_comparison(store: Store, run_id: str, *, compute_if_missing: bool = True) -> stats.Comparison | None:
    """The stored comparison of a run, or (for runs that never finished) one computed now."""
    data = store.get_comparison(run_id)
    if data is not None:
        return stats.Comparison.from_dict(data)
    return analyse_run(store, run_id, save=False) if compute_if_missing else None
