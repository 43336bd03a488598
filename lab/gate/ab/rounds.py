"""The interleaved rounds of `balloon-lab ab`: every arm once per side per round.

Round r runs each arm with the base and with the candidate, seed = r, probes off
(timings come from unprobed processes). Two ways, chosen by what both sides' `run`
can do (lab/gate/ab/sides.py reads it from their help):

- paced (`run --cycles K --paced`): both sides' processes start and prepare their
  guests at once, then their K inflate/deflate cycles run in turn, A B B A A B ...,
  each side idle while the other is measured. A cycle of the base and the same cycle
  of the candidate are seconds apart: a busy neighbour or the kernel's drift hits
  both. Each cycle is one pair. Between cycles the workload gives deflated memory its
  contents back (the retouch: two thirds of a bitmap cycle's time at CI's size); when
  both sides can (`--pace-retouch`) they do it at once, before the turns, not inside
  them; against an older side both do it inside their turns, so the two are alike.
  K is per arm: an arm whose cycles are cheap next to its processes' start gets more.
  Both sides' processes run on one CPU (Plan.pin_cpu, lab/gate/ab/pinning.py): which
  CPU a process landed on no longer differs by side.
- trials (an old side: `run --json` only): the two trials of a round run back to back,
  one cycle each, the order alternating by round and by arm (base first in round 1 for
  the first arm, candidate first for the second...). Each round is one pair.

Extra rounds for some arms (their answer not yet clear) start with the order swapped,
as Firecracker's A/B retries do.
"""
from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable

from lab.gate.ab.sides import Side
from lab.results.metrics import flatten

TRIAL_TIMEOUT_S = 900      # a whole trial (trials mode), or one cycle (paced)
PACED, TRIALS = "paced", "trials"
STOPPED_WITH_CANDIDATE = "stopped with the candidate"


@dataclass(frozen=True)
class Plan:
    """What each trial runs (options every side's `run` has) and how many rounds."""

    arms: tuple[str, ...]
    guest_mib: int
    inflate_mib: float
    workload: str
    params: tuple[str, ...]          # KEY=VALUE, as `run --param` takes them
    cycles: tuple[tuple[str, int], ...]   # per trial, per arm, when both sides are paced
    rounds: int                      # the first batch
    max_rounds: int                  # at most, with the extra rounds
    step: int = 2                    # extra rounds at a time (even: the order stays balanced)
    pin_cpu: int | None = None       # paced cycles of both sides on this CPU (lab/gate/ab/pinning.py)

    def cycles_of(self, arm: str) -> int:
        return dict(self.cycles)[arm]

    def run_args(self, arm: str, seed: int, paced: bool = False, retouch_apart: bool = False) -> list[str]:
        """`run`'s arguments for one trial: paced cycles for a paced pair (the retouch
        apart when both sides can: the two are always treated alike), else one cycle."""
        args = ["run", "--protocol", arm, "--guest-mib", str(self.guest_mib), "--inflate-mib", f"{self.inflate_mib:g}",
                "--workload", self.workload, "--seed", str(seed), "--no-probes", "--json"]
        for p in self.params:
            args += ["--param", p]
        if paced:
            args += ["--cycles", str(self.cycles_of(arm)), "--paced"] + (["--pace-retouch"] if retouch_apart else [])
        return args


def describe_cycles(cycles: dict[str, int]) -> str:
    """'4 cycle(s) per trial', or per arm when they differ."""
    if len(set(cycles.values())) == 1:
        return f"{next(iter(cycles.values()))} cycle(s) per trial"
    return "cycles per trial " + ", ".join(f"{a} {k}" for a, k in cycles.items())


def mode_of(base: Side, candidate: Side) -> str:
    """paced when both sides' `run` can pace their cycles, else whole trials."""
    return PACED if base.paced and candidate.paced else TRIALS


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


class BaseFailed(Exception):
    """The base's trial failed: nothing can be compared against it (exit 2)."""


def _trial_from(side: Side, arm: str, rnd: int, out: str, rc: int | None, stderr: str, t0: float,
                wall0: float) -> Trial:
    """A Trial from `run --json`'s output (its last line); a run that failed or did not
    verify is a Trial with `error` (its metrics kept, never compared)."""
    seconds = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict) or "verified" not in result:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return Trial(side.label, arm, rnd, [], seconds, wall0, f"exit {rc}: {tail}")
    metrics = [flatten(c)[0] for c in [result, *(result.get("cycles") or [])]]
    error = None if rc == 0 and result["verified"] else f"exit {rc}, verified: {result['verified']}"
    return Trial(side.label, arm, rnd, metrics, seconds, wall0, error)


def run_trial(side: Side, arm: str, rnd: int, plan: Plan) -> Trial:
    """One `balloon-lab run --json` of `side`'s code, one cycle."""
    t0, wall0 = time.perf_counter(), time.time()
    try:
        p = subprocess.run(side.command(*plan.run_args(arm, rnd)), cwd=side.path, env=side.env(),
                           capture_output=True, text=True, timeout=TRIAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Trial(side.label, arm, rnd, [], time.perf_counter() - t0, wall0, f"timed out after {TRIAL_TIMEOUT_S} s")
    return _trial_from(side, arm, rnd, p.stdout, p.returncode, p.stderr, t0, wall0)


class _Paced:
    """One side's `run --paced` process: lines from its stdout through a queue, so a
    side that dies or stalls is noticed with a timeout, never a hang."""

    def __init__(self, side: Side, args: list[str], cpu: int | None = None) -> None:
        self.side = side
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(side.command(*args, cpu=cpu), cwd=side.path, env=side.env(),
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.at_end = False           # the end of its output was read: nothing more will come
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def next(self, timeout: float) -> dict | None:
        """The next JSON line, or None at the end of the output (or after `timeout`). Once
        the end was read, None at once: a side that died is not waited for again."""
        if self.at_end:
            return None
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            self.at_end = True
            return None
        self.seen.append(line)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {}

    def go(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, rnd: int, arm: str, t0: float, wall0: float) -> Trial:
        """Wait for the result line and the exit; the Trial."""
        while self.next(TRIAL_TIMEOUT_S) is not None:
            pass
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.err.seek(0)
        return _trial_from(self.side, arm, rnd, "".join(self.seen), rc, self.err.read(), t0, wall0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def run_paced_pair(first: Side, second: Side, arm: str, rnd: int, plan: Plan) -> list[Trial]:
    """Both sides' trials of `arm` in round `rnd`, their cycles in turn (first, second,
    second, first, ...). A side that fails ends both trials; its Trial says why."""
    t0, wall0 = time.perf_counter(), time.time()
    apart = first.retouch_apart and second.retouch_apart
    args = plan.run_args(arm, rnd, True, apart)
    sides = [_Paced(s, args, plan.pin_cpu) for s in (first, second)]
    try:
        for c in range(1, plan.cycles_of(arm) + 1):
            if apart and c > 1:                   # both retouch at once, neither is measured
                for s in sides:
                    line = s.next(TRIAL_TIMEOUT_S)
                    if not line or line.get("retouch") != c:
                        return _ended(sides, s, rnd, arm, t0, wall0)
                for s in sides:
                    s.go()
            for s in sides:                       # both prepared (or done with the last cycle)
                line = s.next(TRIAL_TIMEOUT_S)
                if not line or line.get("waiting") != c:
                    return _ended(sides, s, rnd, arm, t0, wall0)
            for s in (sides if c % 2 else sides[::-1]):
                s.go()
                line = s.next(TRIAL_TIMEOUT_S)
                if not line or line.get("cycle") != c:
                    return _ended(sides, s, rnd, arm, t0, wall0)
        return [s.finish(rnd, arm, t0, wall0) for s in sides]
    finally:
        for s in sides:
            s.stop()


def _ended(sides: list[_Paced], culprit: _Paced, rnd: int, arm: str, t0: float, wall0: float) -> list[Trial]:
    """`culprit` stopped answering: close both sides' stdin (a paced run then fails at
    once) and take the culprit's own account of what happened. The other side's trial
    fails too, for that reason; a base that fails ends the comparison (BaseFailed)."""
    for s in sides:
        try:
            s.proc.stdin.close()
        except OSError:
            pass
    trials = [s.finish(rnd, arm, t0, wall0) for s in sides]
    bad = trials[sides.index(culprit)]
    bad.error = bad.error or "stopped answering"
    if culprit.side.label == "base":
        raise BaseFailed(f"the base ({culprit.side.ref}) failed its {arm} trial in round {rnd}: {bad.error}")
    for t in trials:
        if t is not bad:
            t.error = f"{STOPPED_WITH_CANDIDATE}: {bad.error}"
    return trials


@dataclass
class Rounds:
    """Every trial so far, by (side, arm, round)."""

    trials: dict[tuple[str, str, int], Trial] = field(default_factory=dict)
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)    # (arm, round): both sides' time

    def rounds_of(self, arm: str) -> list[int]:
        """Rounds in which both sides ran `arm`."""
        return sorted(r for (s, a, r) in self.trials if a == arm and s == "base"
                      and ("candidate", arm, r) in self.trials)

    def pair(self, arm: str, rnd: int) -> tuple[Trial, Trial]:
        return self.trials["base", arm, rnd], self.trials["candidate", arm, rnd]

    def seconds_per_round(self, arms: Iterable[str]) -> float:
        """What one more round of these arms takes, from the rounds so far."""
        total = 0.0
        for arm in arms:
            mine = [s for (a, _r), s in self.seconds.items() if a == arm]
            total += sum(mine) / len(mine) if mine else 0.0
        return total


def run_rounds(base: Side, candidate: Side, plan: Plan, arms: Iterable[str], rounds: Iterable[int], into: Rounds,
               *, swapped: bool = False, progress: Callable[[str], None] | None = None) -> None:
    """Run `rounds` of `arms`, interleaved (see the module doc); `swapped` starts with
    the candidate. A failed base trial stops everything (BaseFailed): no comparison
    can be made against a base that does not run."""
    paced = mode_of(base, candidate) == PACED
    arms = list(arms)
    for rnd in rounds:
        for i, arm in enumerate(arms):
            base_first = (rnd + i + swapped) % 2 == 1
            order = (base, candidate) if base_first else (candidate, base)
            t0 = time.perf_counter()
            trials = run_paced_pair(*order, arm, rnd, plan) if paced else [run_trial(s, arm, rnd, plan) for s in order]
            for t in trials:
                into.trials[t.side, arm, rnd] = t
            into.seconds[arm, rnd] = time.perf_counter() - t0
            if progress is not None:
                bad = "; ".join(f"{t.side} FAILED: {t.error}" for t in trials if t.error)
                progress(f"round {rnd} {arm:8} {order[0].label} first  {into.seconds[arm, rnd]:5.1f} s"
                         + (f"  {bad}" if bad else ""))
            b = into.trials["base", arm, rnd]
            if b.error and not b.error.startswith(STOPPED_WITH_CANDIDATE):
                raise BaseFailed(f"the base ({base.ref}) failed its {arm} trial in round {rnd}: {b.error}")
