"""What the probes cost each arm: the probed trials' own measurement (probes/costs.py:
bpf_stats per program, the syscall hook and the USDT trap calibrated), beside what the
twin pairs measured (lab/twins.py) for the same trials.

The two should agree: the twin pairs measure the slow-down from outside (probed minus
detached twin), the programs' costs add up what the kernel measured inside. `compare`,
`show` and the report print both, per arm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from lab.analysis import stats
from lab.trials import twins
from fmt.text_width import fold
from probes.costs import cost_lines, median_rows

INFLATE_TOTAL = ("stages_ns", "inflate", "total")


@dataclass
class ArmProbeCost:
    """One arm's measured probe cost per inflate (medians over its probed trials)."""

    arm: str
    trials: int
    rows: dict[str, dict[str, float]]          # program -> events, ns_per_event, ms
    total_ms: float                            # median of the trials' probe_cost_ms
    inflate_ms: float | None                   # median inflate total the share is of (detached twin's, if twins)
    twin_ms: tuple[float, float | None, float | None] | None   # median per pair of probed - detached, with CI
    foreign_ms: float = 0.0                    # median ms of other tools' BPF programs in the probed trials

    def within(self, ms: float) -> bool | None:
        """`ms` lies within the twin pairs' 95 % CI (None without twins)."""
        if self.twin_ms is None or self.twin_ms[1] is None or self.twin_ms[2] is None:
            return None
        return self.twin_ms[1] <= ms <= self.twin_ms[2]

    @property
    def agrees(self) -> bool | None:
        """The measured total lies within the twin pairs' 95 % CI (None without twins)."""
        return self.within(self.total_ms)


def _dig(d: Any, path: tuple[str, ...]) -> float | None:
    for k in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def arm_costs(trials: list[Any]) -> list[ArmProbeCost]:
    """Per arm, from its ok measured trials (TrialRecord-like: arm, status, warmup, result)
    whose probes measured their cost."""
    by_arm: dict[str, list[Mapping[str, Any]]] = {}
    for t in trials:
        if t.status != "ok" or t.warmup or not isinstance(t.result, Mapping):
            continue
        if (t.result.get("probes") or {}).get("probe_cost_ms") is not None:
            by_arm.setdefault(t.arm, []).append(t.result)
    out = []
    for arm, results in by_arm.items():
        probes = [r["probes"] for r in results]
        totals = [_dig(r, INFLATE_TOTAL) for r in results]
        inflate = [x / 1e6 for x in totals if x is not None]
        diffs = []
        for r, u in zip(results, totals):
            p = _dig((r.get(twins.TWIN_KEY) or {}).get("probed_timings"), INFLATE_TOTAL)
            if p is not None and u is not None:
                diffs.append((p - u) / 1e6)
        out.append(ArmProbeCost(
            arm, len(results), median_rows(probes), float(np.median([p["probe_cost_ms"] for p in probes])),
            float(np.median(inflate)) if inflate else None,
            stats.median_ci(np.array(diffs)) if diffs else None,
            float(np.median([(p.get("foreign_bpf") or {}).get("ms", 0.0) for p in probes]))))
    return out


def _ms_ci(m: tuple[float, float | None, float | None]) -> str:
    med, lo, hi = m
    if lo is None or hi is None or math.isnan(med):
        return f"{med:+.1f} ms"
    return f"{med:+.1f} ms [{lo:+.1f}, {hi:+.1f}]"


def verdict(c: ArmProbeCost) -> str:
    """How the measured total compares with the twin pairs' difference, in words."""
    if c.twin_ms is None:
        return ""
    foreign = (f"; other tools' BPF programs on the machine ran {c.foreign_ms:.1f} ms per probed trial "
               f"(median), with this session's statistics on" if c.foreign_ms >= 0.05 else "")
    twin = (f"measured {c.total_ms:.1f} ms per trial (median){foreign}; twin pairs: probed - detached "
            f"{_ms_ci(c.twin_ms)} (median per pair, 95 % CI)")
    if c.agrees is None:
        return twin
    if c.agrees:
        return f"{twin}: within it"
    if foreign and c.within(c.total_ms + c.foreign_ms):
        return f"{twin}: the two together within it"
    side = "below" if c.total_ms < (c.twin_ms[1] or 0) else "above"
    return f"{twin}: {side} it (docs/PROBES.md, 'Where the rest goes')"


def cost_table(trials: list[Any]) -> str:
    """The per-arm probe-cost tables `compare` and `show` print ("" when nothing was measured)."""
    costs = arm_costs(trials)
    if not costs:
        return ""
    out = ["probe cost per inflate, per arm: measured in the probed trials (each program's run time from bpf_stats, "
           "every process's runs, `probed` of them the trial's; the syscall hook and the USDT trap calibrated per "
           "session), medians:"]
    for c in costs:
        of = f"; inflate {c.inflate_ms:.1f} ms" if c.inflate_ms else ""
        out.append(f"{c.arm} ({c.trials} probed trials{of})")
        out += ["  " + line for line in cost_lines(c.rows, c.inflate_ms, docs=False)]
        v = verdict(c)
        if v:
            out.append("  " + v)
    return fold("\n".join(out))


def costs_json(trials: list[Any]) -> list[dict[str, Any]]:
    """The same per arm, for --json."""
    return [{"arm": c.arm, "trials": c.trials, "programs": c.rows, "total_ms": c.total_ms,
             "foreign_bpf_ms": c.foreign_ms, "inflate_ms": c.inflate_ms, "twin_ms": c.twin_ms,
             "within_twin_ci": c.agrees} for c in arm_costs(trials)]
