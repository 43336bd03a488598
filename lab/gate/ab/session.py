"""One `balloon-lab ab` from start to verdict: prepare both sides, run the first rounds,
decide, give the arms whose answer is not clear more rounds (order swapped, bounded
by --max-rounds and --budget), decide again, and remove the worktrees it made.

A flagged regression is never final after the first rounds: its arm gets more rounds
first, as Firecracker retries a failed A/B test in swapped order before it fails, and
the verdict is taken on every round. An arm is done when none of its timings is
unclear, or when a regression of it held after more rounds (confirmed). Under a time
box (--budget) the arms still undecided get the extra rounds first, and regressions
their confirming rounds only when no arm is undecided: a regression is already a
decision at alpha (Holm), the confirmation a second look when there is time for it.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab.gate.ab.paired import ALPHA
from lab.gate.ab.rounds import PACED, Plan, Rounds, describe_cycles, mode_of, run_rounds
from lab.gate.ab.sides import Side, prepare_side, remove_side, resolve_commit, workdir
from lab.paths import REPO_ROOT
from lab.gate.ab.verdict import ABResult, MetricRule, judge, track_flags


@dataclass(frozen=True)
class Settings:
    plan: Plan
    rules: tuple[MetricRule, ...]
    ignored: tuple[str, ...]
    alpha: float = ALPHA
    budget_s: float | None = None        # stop adding rounds when the next would end after this


def run_ab(base_ref: str, candidate_ref: str | None, settings: Settings,
           progress: Callable[[str], None] | None = None, repo: Path | None = None) -> ABResult:
    """The whole comparison; SideError / BaseFailed (exit 2) when it cannot be made."""
    repo = repo or REPO_ROOT          # the checkout this lab runs from: the candidate by default
    resolve_commit(repo, "HEAD")            # a git repository at all (SideError otherwise)
    t0 = time.monotonic()
    work = workdir()
    sides: list[Side] = []
    try:
        base = prepare_side("base", base_ref, repo, work)
        sides.append(base)
        candidate = prepare_side("candidate", candidate_ref, repo, work)
        sides.append(candidate)
        if progress:
            progress(f"ab: base {base.describe()}")
            progress(f"ab: candidate {candidate.describe()}")
        return _compare(base, candidate, settings, t0, progress)
    finally:
        for s in sides:
            remove_side(s, repo)
        shutil.rmtree(work, ignore_errors=True)


def _compare(base: Side, candidate: Side, settings: Settings, t0: float,
             progress: Callable[[str], None] | None) -> ABResult:
    plan = settings.plan
    mode = mode_of(base, candidate)
    cycles = dict(plan.cycles) if mode == PACED else {a: 1 for a in plan.arms}
    notes = []
    if mode != PACED:
        old = [s.describe() for s in (base, candidate) if not s.paced]
        notes.append(f"trials mode, one cycle per trial: no `run --cycles --paced` in {'; '.join(old)}")
    rounds = Rounds()
    if progress:
        pinned = f", pinned to CPU {plan.pin_cpu}" if mode == PACED and plan.pin_cpu is not None else ""
        progress(f"ab: {mode} mode, {describe_cycles(cycles)}{pinned}, arms {', '.join(plan.arms)}, "
                 f"{plan.rounds} rounds (up to {plan.max_rounds})")

    def decide() -> ABResult:
        return judge(rounds, plan.arms, settings.rules, base=base, candidate=candidate, mode=mode, cycles=cycles,
                     ignored=settings.ignored, alpha=settings.alpha)

    done = 0
    for rnd in range(1, plan.rounds + 1):
        run_rounds(base, candidate, plan, plan.arms, [rnd], rounds, progress=progress)
        done = rnd
        result = decide()
        exact = [c for c in result.counters if c.status == "regression"] + [
            t for t in result.trials if t.status == "regression"]
        if exact:       # an exact check failed: no timing can change that answer
            notes.append(f"stopped after round {rnd}: an exact check failed, timings need not be decided")
            break
    flagged: dict[tuple[str, str], int] = {}
    track_flags(result, flagged)
    while not exact and done < plan.max_rounds:
        undecided, unconfirmed = result.open_arms(flagged)
        # Under a time box the undecided arms come first: a regression is already a
        # decision at alpha, its confirming rounds wait until no arm is unclear.
        wanted = set(undecided) if settings.budget_s is not None and undecided else set(undecided + unconfirmed)
        arms = [a for a in plan.arms if a in wanted]
        if not arms:
            break
        step = min(plan.step, plan.max_rounds - done)
        per_round = rounds.seconds_per_round(arms)
        if settings.budget_s is not None and time.monotonic() - t0 + step * per_round > settings.budget_s:
            notes.append(f"no more rounds for {', '.join(arms)}: {step} more would pass the "
                         f"{settings.budget_s:g} s budget (about {per_round:.0f} s a round)")
            break
        if progress:
            progress(f"ab: {', '.join(arms)} not clear after {done} rounds: {step} more, order swapped")
        run_rounds(base, candidate, plan, arms, range(done + 1, done + step + 1), rounds, swapped=True,
                   progress=progress)
        done += step
        result = decide()
        track_flags(result, flagged)
    unconfirmed = result.open_arms(flagged)[1]
    if unconfirmed and not exact:
        notes.append(f"{', '.join(unconfirmed)}: regression seen at one look only (no rounds were left to see "
                     "it again); it stands, decided at alpha")
    result.notes = notes + result.notes
    result.seconds = time.monotonic() - t0
    result.pin_cpu = plan.pin_cpu if mode == PACED else None
    result.raw = rounds
    return result
