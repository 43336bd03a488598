"""The interleaved rounds of `balloon-lab ab`: every arm once per side per round.

Round r runs each arm with the base and with the candidate back to back, seed = r,
the order alternating by round and by arm (base first in round 1 for the first arm,
candidate first for the second, and so on), so the machine's drift, a busy neighbour
or a warm cache hits both sides alike. A trial is one `balloon-lab run --json` of that
side's code, probes off (timings come from unprobed processes); when both sides can
(`run --cycles`), a trial repeats its inflate/deflate cycle K times in one pair of
processes and ab keeps every cycle.

More rounds for some arms (when their answer is not yet clear) start with the order
swapped, as Firecracker's A/B retries do.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from lab.ab_sides import Side
from lab.metrics import flatten

TRIAL_TIMEOUT_S = 900


@dataclass(frozen=True)
class Plan:
    """What each trial runs (the options every side's `run` has) and how many rounds."""

    arms: tuple[str, ...]
    guest_mib: int
    inflate_mib: float
    workload: str
    params: tuple[str, ...]          # KEY=VALUE, as `run --param` takes them
    cycles: int                      # per trial, when both sides can
    rounds: int                      # the first batch
    max_rounds: int                  # at most, with the extra rounds
    step: int = 2                    # extra rounds at a time (even: the order stays balanced)

    def run_args(self, arm: str, seed: int, cycles: int) -> list[str]:
        args = ["run", "--protocol", arm, "--guest-mib", str(self.guest_mib), "--inflate-mib", f"{self.inflate_mib:g}",
                "--workload", self.workload, "--seed", str(seed), "--no-probes", "--json"]
        for p in self.params:
            args += ["--param", p]
        if cycles > 1:
            args += ["--cycles", str(cycles)]
        return args


@dataclass
class Trial:
    """One side's trial of one arm in one round: each cycle's metrics, flattened."""

    side: str
    arm: str
    round: int
    cycles: list[dict[str, float]]
    seconds: float
    started: float                   # time.time() at the start
    error: str | None = None         # the trial failed or did not verify

    def to_dict(self) -> dict:
        return {"side": self.side, "arm": self.arm, "round": self.round, "seconds": round(self.seconds, 3),
                "started": self.started, "error": self.error, "cycles": self.cycles}


class TrialError(Exception):
    """A side's trial gave no usable result (the base's: the comparison cannot go on)."""


def run_trial(side: Side, arm: str, rnd: int, plan: Plan, cycles: int) -> Trial:
    """One `balloon-lab run --json` of `side`'s code. A run that fails or does not verify
    is a Trial with `error` (its metrics, if any, are kept but never compared)."""
    t0, wall0 = time.perf_counter(), time.time()
    try:
        p = subprocess.run(side.command(*plan.run_args(arm, rnd, cycles)), cwd=side.path, env=side.env(),
                           capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Trial(side.label, arm, rnd, [], time.perf_counter() - t0, wall0,
                     f"timed out after {TRIAL_TIMEOUT_S} s")
    seconds = time.perf_counter() - t0
    try:
        result = json.loads(p.stdout)
    except json.JSONDecodeError:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return Trial(side.label, arm, rnd, [], seconds, wall0, f"exit {p.returncode}: {tail}")
    cycles_out = [result, *(result.get("cycles") or [])]
    metrics = [flatten(c)[0] for c in cycles_out]
    error = None
    if p.returncode != 0 or not result.get("verified", False):
        error = f"exit {p.returncode}, verified: {result.get('verified')}"
    return Trial(side.label, arm, rnd, metrics, seconds, wall0, error)


@dataclass
class Rounds:
    """Every trial so far, by (side, arm, round)."""

    trials: dict[tuple[str, str, int], Trial] = field(default_factory=dict)

    def rounds_of(self, arm: str) -> list[int]:
        """Rounds in which both sides ran `arm`."""
        rs = {r for (s, a, r) in self.trials if a == arm and s == "base"}
        return sorted(r for r in rs if ("candidate", arm, r) in self.trials)

    def pair(self, arm: str, rnd: int) -> tuple[Trial, Trial]:
        return self.trials["base", arm, rnd], self.trials["candidate", arm, rnd]

    def seconds(self) -> float:
        return sum(t.seconds for t in self.trials.values())


def run_rounds(base: Side, candidate: Side, plan: Plan, arms: Iterable[str], rounds: Iterable[int], into: Rounds,
               *, swapped: bool = False, progress: Callable[[str], None] | None = None) -> None:
    """Run `rounds` of `arms`, interleaved (see the module doc); `swapped` starts with
    the candidate. A failed base trial stops everything (TrialError): no comparison
    can be made against a base that does not run."""
    cycles = plan.cycles if base.cycles and candidate.cycles else 1
    arms = list(arms)
    for rnd in rounds:
        for i, arm in enumerate(arms):
            base_first = (rnd + i + swapped) % 2 == 1
            for side in ((base, candidate) if base_first else (candidate, base)):
                t = run_trial(side, arm, rnd, plan, cycles)
                into.trials[side.label, arm, rnd] = t
                if progress is not None:
                    progress(f"round {rnd} {arm:8} {side.label:9} {t.seconds:5.1f} s"
                             + (f"  FAILED: {t.error}" if t.error else ""))
                if t.error and side is base:
                    raise TrialError(f"the base ({base.ref}) failed its {arm} trial in round {rnd}: {t.error}")
