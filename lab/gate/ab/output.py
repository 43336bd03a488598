"""`balloon-lab ab`'s answer for people: the verdict, one line per gated timing (ratio,
CI, p, minimum detectable effect, why), the counters and trials that regressed, notes;
and the same as a markdown table for a CI step summary."""
from __future__ import annotations

import math

from lab.gate.ab.paired import PairedResult
from lab.gate.ab.rounds import describe_cycles
from lab.gate.ab.verdict import ABResult
from fmt.columns import format_columns
from lab.analysis.stats import value_formatter

_HEAD = {"pass": "PASS", "regression": "REGRESSION", "inconclusive": "INCONCLUSIVE"}


def headline(r: ABResult) -> str:
    n = len(r.regressions)
    what = {"pass": "no regression", "regression": f"{n} regression{'s' * (n != 1)}",
            "inconclusive": (f"{len(r.unclear)} timing(s) unclear after the extra rounds" if r.unclear else
                             f"no timing both sides measure in {', '.join(r.ungated)}")}[r.verdict]
    return f"ab: {_HEAD[r.verdict]} (exit {r.exit_code}): {what}"


def _pinned(r: ABResult) -> str:
    return "" if r.pin_cpu is None else f" on CPU {r.pin_cpu}"


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    return "any" if math.isinf(x) else f"{x:.1%}"


def _row(t: PairedResult) -> list[str]:
    fmt = value_formatter(t.metric, [t.base_median, t.candidate_median])
    ci = f"[{t.ci_low:.3f}, {t.ci_high:.3f}]" if t.ci_low is not None else ""
    p = "-" if t.p is None or t.p_holm is None else f"{t.p:.2g}" if t.checks == 1 else f"{t.p:.2g} ({t.p_holm:.2g})"
    return [t.arm, t.metric, f"{t.n}/{t.pairs}", fmt(t.base_median), fmt(t.candidate_median),
            f"{t.ratio:.3f} {ci}".strip(), p, _pct(t.mde), f"{t.verdict}: {t.why}"]


HEADER = ["arm", "metric", "rounds/pairs", "base", "candidate", "cand/base [95% CI]", "p (Holm)", "MDE", "verdict"]


def render_text(r: ABResult, *, verbose: bool = False) -> str:
    lines = [headline(r), f"  base:      {r.base.describe()}", f"  candidate: {r.candidate.describe()}",
             f"  {r.mode} mode, {describe_cycles(r.cycles)}{_pinned(r)}, {_rounds(r)}; {r.seconds / 60:.1f} min",
             f"  regression = worse than the minimum effect and p < {r.alpha:g} (signed-rank over the rounds' "
             f"ratios, one-sided; Holm over the run's {len(r.timings)} timings)"]
    if r.timings:
        lines.append(_indent(format_columns(HEADER, [_row(t) for t in r.timings], right={2})))
    bad_trials = [t for t in r.trials if t.status == "regression"]
    for t in bad_trials:
        lines.append(f"  REGRESSION {t.arm} trials: {t.message}")
    shown = [c for c in r.counters if c.status == "regression" or (verbose and c.status != "pass")]
    for c in shown:
        lines.append(f"  {c.status.upper() if c.status == 'regression' else c.status:<10} {c.arm} {c.metric}: "
                     f"{c.message}")
    equal = sum(c.status == "pass" for c in r.counters)
    lines.append(f"  counters: {equal} exact checks equal in every pair"
                 + (f", {sum(c.status == 'regression' for c in r.counters)} not" if shown else ""))
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def _rounds(r: ABResult) -> str:
    by = {t.arm: t.rounds for t in r.trials}
    if len(set(by.values())) == 1:
        return f"{next(iter(by.values()))} rounds"
    return "rounds " + ", ".join(f"{a} {n}" for a, n in by.items())


def _indent(text: str) -> str:
    return "\n".join("  " + ln for ln in text.splitlines())


def render_markdown(r: ABResult) -> str:
    """A GitHub step summary: verdict, the timing table, what regressed."""
    icon = {"pass": "✅", "regression": "❌", "inconclusive": "⚠️"}[r.verdict]
    out = [f"### {icon} balloon-lab ab: {_HEAD[r.verdict]} (exit {r.exit_code})", "",
           f"base `{r.base.describe()}` · candidate `{r.candidate.describe()}` · {r.mode} mode, "
           f"{describe_cycles(r.cycles)}{_pinned(r)}, {_rounds(r)}, {r.seconds / 60:.1f} min", ""]
    if r.timings:
        out += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in _row(t)) + " |" for t in r.timings]
        out.append("")
    for line in r.regressions:
        out.append(f"- **regression** {line}")
    out += [f"- note: {n}" for n in r.notes]
    return "\n".join(out) + "\n"
