"""`balloon-lab ab BASE [CANDIDATE]`: two revisions of the lab, interleaved in one job, gated.

Exit 0 no regression, 1 regression, 3 inconclusive, 2 unusable input. --json prints the
answer on stdout; under GitHub Actions a step summary and annotations are written too.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from device.api import PROTOCOL_NAMES
from lab.results import metrics as lab_metrics
from lab.gate.ab.output import render_markdown, render_text
from lab.gate.ab.paired import ALPHA, MIN_EFFECT
from lab.gate.ab.rounds import BaseFailed, Plan
from lab.gate.ab.session import Settings, run_ab
from lab.gate.ab.pinning import default_cpu
from lab.gate.ab.sides import SideError
from lab.gate.ab.verdict import DEFAULT_IGNORED, DEFAULT_METRICS, EXIT_UNUSABLE, MetricRule, to_dict
from lab.gate.ci_summary import report_to_github
from lab.cli.checks import writable_file

# CI's size (.ci/run): what fits ~5 minutes on 2 cores and still sees a 10 % slower
# discard on every arm (docs/STATISTICS.md, docs/BENCHMARKS.md).
DEFAULT_ARMS = "pfn,bitmap,chunks"
DEFAULT_GUEST_MIB, DEFAULT_INFLATE_MIB = 512, 384
# 10 rounds: the fewest whose p (1/1024), Holm-corrected over the nine default timings,
# can be below 0.01. Cycles per trial, per arm: at CI's size a bitmap or chunks cycle
# costs ~0.8 s (one CPU, both sides' retouch and turns) beside ~3 s to start and prepare
# both sides, and with both sides pinned to one CPU the per-round spread of
# discard_cpu_ns keeps falling with cycles (log ratio: 0.045 at 4, 0.030 at 6, 0.025 at 8;
# unpinned it stopped at 0.05-0.07). pfn's cycle costs ~1.2 s and 4 see a 10 % slower
# discard at 10 rounds (docs/BENCHMARKS.md, "The A/B gate at CI's size").
# Up to 24 rounds: --budget is the bound that matters in CI.
DEFAULT_CYCLES: dict[str, int] = {"pfn": 4, "bitmap": 6, "chunks": 6}
DEFAULT_ROUNDS, DEFAULT_MAX_ROUNDS = 10, 24


def _fraction(text: str, what: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise click.BadParameter(f"{what}: {text!r} is not a fraction or a percentage (e.g. 5% or 0.05)") from None
    if not 0 < v < 1:
        raise click.BadParameter(f"{what}: {text!r} must be between 0 and 100 %")
    return v


def _cycles_text(cycles: dict[str, int]) -> str:
    return ", ".join(f"{a}={k}" for a, k in cycles.items())


def _cycles(items: tuple[str, ...], arms: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """--cycles K / ARM=K, applied in order over the defaults: cycles per trial per arm."""
    out = {a: DEFAULT_CYCLES.get(a, 4) for a in arms}
    for item in items:
        name, sep, k = item.rpartition("=")
        name = name.strip()
        if sep and name not in PROTOCOL_NAMES:
            raise click.BadParameter(f"{item!r}: {name!r} is not a lab arm ({', '.join(PROTOCOL_NAMES)})",
                                     param_hint="--cycles")
        try:
            n = int(k)
        except ValueError:
            n = 0
        if not 1 <= n <= 100:
            raise click.BadParameter(f"{item!r}: cycles must be a whole number from 1 to 100", param_hint="--cycles")
        for a in ([name] if sep else arms):
            if a in out:
                out[a] = n
    return tuple(out.items())


def _pin_cpu(text: str) -> int | None:
    t = text.strip().lower()
    if t == "none":
        return None
    if t == "auto":
        return default_cpu()
    allowed = sorted(os.sched_getaffinity(0))
    if not t.isdigit() or int(t) not in allowed:
        raise click.BadParameter(f"{text!r}: a CPU this process may use ({', '.join(map(str, allowed))}), "
                                 "auto or none", param_hint="--pin-cpu")
    return int(t)


def _rules(items: tuple[str, ...], min_effect: float) -> tuple[MetricRule, ...]:
    out = []
    for item in items or DEFAULT_METRICS:
        name, sep, effect = item.partition("=")
        name = name.strip()
        try:
            kind = lab_metrics.classify(name)
        except lab_metrics.UndeclaredMetric as e:
            raise click.BadParameter(str(e), param_hint="--metric") from None
        if not lab_metrics.is_statistical(kind) or lab_metrics.better(name) not in (lab_metrics.LOWER,
                                                                                   lab_metrics.HIGHER):
            raise click.BadParameter(f"{name} is a {kind} ({lab_metrics.better(name)}): ab gates timings and "
                                     "gauges with a better side; counters are compared exactly anyway",
                                     param_hint="--metric")
        out.append(MetricRule(name, _fraction(effect, name) if sep else min_effect))
    return tuple(out)


@click.command("ab", epilog="""\b
examples:
    balloon-lab ab 59e0f30                       # main as it was against the working tree
    balloon-lab ab HEAD HEAD --arms bitmap       # A/A: the same commit in two worktrees
    balloon-lab ab $(cat .ci/gate/base) --json --budget 480     # what .ci/run does
    balloon-lab ab main ../other-checkout --metric stages_ns.inflate.total=10%
""")
@click.argument("base")
@click.argument("candidate", required=False)
@click.option("--arms", default=DEFAULT_ARMS, show_default=True, help="Comma-separated lab arms.")
@click.option("--guest-mib", type=click.IntRange(64, 65536), default=DEFAULT_GUEST_MIB, show_default=True)
@click.option("--inflate-mib", type=click.FloatRange(1, min_open=False), default=DEFAULT_INFLATE_MIB,
              show_default=True)
@click.option("--workload", default="aged", show_default=True,
              help="Guest workload; paced cycles need one that can repeat them (aged).")
@click.option("--workload-param", "--param", "params", multiple=True, metavar="KEY=VALUE")
@click.option("--cycles", "cycle_items", multiple=True, metavar="[ARM=]K",
              help="Inflate/deflate cycles per trial when both sides are paced (each one pair): K for every arm, "
                   "or ARM=K for one (repeatable). Default: " + _cycles_text(DEFAULT_CYCLES) + ".")
@click.option("--pin-cpu", default="auto", show_default=True, metavar="CPU|auto|none",
              help="Run both sides' paced trials (their VMMs and guests) on this CPU only (auto: the last CPU this "
                   "process may use; none: leave them to the scheduler).")
@click.option("--rounds", type=click.IntRange(1, 1000), default=DEFAULT_ROUNDS, show_default=True,
              help="Rounds before the first decision (7 is the fewest whose signed-rank test can reach p < 0.01).")
@click.option("--max-rounds", type=click.IntRange(1, 1000), default=DEFAULT_MAX_ROUNDS, show_default=True,
              help="At most this many rounds for an arm whose answer is not clear.")
@click.option("--budget", type=click.FloatRange(1), default=None, metavar="SECONDS",
              help="Add no round that would end after this many seconds (CI's time box).")
@click.option("--metric", "metric_items", multiple=True, metavar="NAME[=EFFECT]",
              help="A timing to gate, with its own minimum effect (repeatable; replaces the defaults: "
                   + ", ".join(DEFAULT_METRICS) + ").")
@click.option("--min-effect", default=f"{MIN_EFFECT:.0%}", show_default=True,
              help="Smallest change that counts as a regression (or an improvement).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=ALPHA,
              show_default=True, help="Significance level for the whole run: each timing's signed-rank p is "
              "Holm-corrected over all the timings gated.")
@click.option("--ignore", "ignored", multiple=True, metavar="PATTERN",
              help="A counter (glob) not to compare, e.g. one removed on purpose (repeatable).")
@click.option("--trials-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every trial (each cycle's metrics) to this file, one JSON object a line.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON on stdout (the text goes to stderr).")
@click.option("-v", "--verbose", is_flag=True, help="Also list ignored and new counters.")
def command(base, candidate, arms, guest_mib, inflate_mib, workload, params, cycle_items, pin_cpu, rounds,
            max_rounds, budget, metric_items, min_effect, alpha, ignored, trials_out, as_json, verbose) -> None:
    """Gate CANDIDATE (default: the working tree) against BASE, each a git revision of this
    repository or the path of a checkout. Both run in one job, interleaved round by round
    (and cycle by cycle when both can), every trial with its own revision's code and this
    interpreter; each timing is decided on paired ratios (signed-rank p, Holm-corrected over
    the run's timings, < alpha and worse than the minimum effect), exact counters must be equal in every pair. Exit 0 no
    regression, 1 regression, 3 inconclusive, 2 unusable input."""
    arm_list = tuple(a.strip() for a in arms.split(",") if a.strip())
    bad = [a for a in arm_list if a not in PROTOCOL_NAMES]
    if not arm_list or bad:
        raise click.BadParameter(f"{', '.join(bad) or 'none given'}: ab gates the lab's arms "
                                 f"({', '.join(PROTOCOL_NAMES)})", param_hint="--arms")
    if inflate_mib >= guest_mib:
        raise click.BadParameter(f"{inflate_mib:g} must be below --guest-mib {guest_mib}", param_hint="--inflate-mib")
    if trials_out is not None:
        writable_file("ab", "--trials-out", trials_out)
    if max_rounds < rounds:
        raise click.BadParameter(f"{max_rounds} is below --rounds {rounds}", param_hint="--max-rounds")
    settings = Settings(
        plan=Plan(arms=arm_list, guest_mib=guest_mib, inflate_mib=inflate_mib, workload=workload,
                  params=tuple(params), cycles=_cycles(cycle_items, arm_list), pin_cpu=_pin_cpu(pin_cpu),
                  rounds=rounds, max_rounds=max_rounds),
        rules=_rules(metric_items, _fraction(min_effect, "--min-effect")),
        ignored=DEFAULT_IGNORED + tuple(ignored), alpha=alpha, budget_s=budget)
    try:
        result = run_ab(base, candidate, settings, progress=lambda line: click.echo(line, err=True))
    except (SideError, BaseFailed) as e:
        click.echo(f"balloon-lab ab: unusable input: {e}", err=True)
        if as_json:
            click.echo(json.dumps({"verdict": "unusable", "exit_code": EXIT_UNUSABLE, "error": str(e)}, indent=1))
        report_to_github("balloon-lab ab", f"### balloon-lab ab: unusable input (exit 2)\n\n{e}\n", [str(e)],
                         json_on_stdout=as_json)
        sys.exit(EXIT_UNUSABLE)
    if trials_out is not None and result.raw is not None:
        with open(trials_out, "w") as f:
            for t in result.raw.trials.values():
                f.write(json.dumps(t.to_dict()) + "\n")
    text = render_text(result, verbose=verbose)
    if as_json:
        click.echo(json.dumps(to_dict(result), indent=1))
    click.echo(text, err=as_json)
    report_to_github("balloon-lab ab", render_markdown(result), result.regressions,
                     [f"{r.arm} {r.metric}: {r.why}" for r in result.unclear], json_on_stdout=as_json)
    sys.exit(result.exit_code)
