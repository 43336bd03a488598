"""`balloon-lab gate`: pass/fail a candidate run against a baseline, for CI.

Exit 0 pass, 1 regression, 2 unusable input. --json and --junit give the verdict to
machines; the text output names every regressed metric with both values.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import click

from lab.gate.ci_summary import report_to_github
from lab.gate.inputs import GateInputError
from lab.gate.result import EXIT_UNUSABLE
from lab.gate.thresholds import Thresholds
from lab.gate.hosts import HostsGateResult, gate_hosts, split_ref
from lab.store.db_path import db_option, default_db_path
from lab.store.store import dumps


def _junit_error(message: str) -> str:
    suites = ET.Element("testsuites", name="balloon-lab gate", tests="1", failures="0", errors="1")
    suite = ET.SubElement(suites, "testsuite", name="balloon-lab gate", tests="1", failures="0", errors="1")
    tc = ET.SubElement(suite, "testcase", classname="balloon-lab.gate", name="gate input")
    ET.SubElement(tc, "error", message=message, type="unusable input")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _record_verdict(db_path, candidate: str, baseline_ref: str, result: HostsGateResult) -> None:
    """Leave the verdict on the candidate run (when it is a stored run, not a file), so
    `history` and the report's history section can mark the runs the gate flagged. Best
    effort: a read-only store only loses the mark, never the gate's answer."""
    from lab.gate.history import gate_note
    from lab.store.store import Store
    ref, _host = split_ref(candidate)
    if Path(ref).is_file():
        return
    regressed = sorted({f"{c.arm} {c.metric}" for _label, r in result.pairs for c in r.regressions})
    verdict = "regression" if regressed else "pass"
    try:
        with Store(db_path, create=False) as store:
            run_id = store.get_run(ref).id
            store.add_note(run_id, gate_note(verdict, baseline_ref, regressed))
    except Exception as e:   # StoreError, or sqlite3.OperationalError on a read-only file
        click.echo(f"gate: could not record the verdict on run {ref}: {e}", err=True)


@click.command("gate")
@click.option("--baseline", required=True, metavar="RUN_OR_FILE",
              help="Baseline: run id (prefix), RUN@HOST for one host of a run, or baseline JSON file.")
@click.option("--candidate", required=True, metavar="RUN_OR_FILE",
              help="Candidate: run id (prefix), RUN@HOST for one host of a run, or baseline JSON file.")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON on stdout.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write JUnit XML (one testcase per arm x metric) to this file.")
@click.option("--threshold", "threshold_items", multiple=True, metavar="METRIC=VALUE",
              help="Per-metric limit, METRIC may be a glob: 'stages_ns.inflate.*=15%', 'kicks=2', "
                   "'probes.page_faults=ignore'. Repeatable; the last match wins.")
@click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML/JSON file with alpha, timing, counter and a [metrics] table of pattern = limit.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Significance level after Holm correction (default 0.05).")
@click.option("--min-trials", type=click.IntRange(min=1), default=None,
              help="Ok measured trials every baseline arm needs in the candidate (default: every measured "
                   "trial of the candidate's spec); an arm below it, failed or missing is a regression.")
@click.option("--allow-spec-change", is_flag=True, help="Gate runs whose experiment specs differ.")
@click.option("--relative", is_flag=True,
              help="Gate timings as ratios to each run's reference (first) arm: cancels machine-wide drift "
                   "between the runs; the reference arm's own timings are then not gated.")
@click.option("--counters-only", is_flag=True,
              help="Gate only the exact counters: allowed across hosts, where timings are not comparable.")
@click.option("--cross-host", is_flag=True,
              help="Gate timings even when baseline and candidate ran on different hosts.")
@click.option("--across-time", is_flag=True,
              help="Gate timings even when the runs were not made in one job (same job id, or the same boot "
                   "and at most 10 min apart): timings drift between such runs here.")
@click.option("-v", "--verbose", is_flag=True, help="List every check, not only regressions and improvements.")
def command(baseline: str, candidate: str, db_path, as_json: bool, junit: Path | None, threshold_items,
            thresholds_file: Path | None, alpha: float | None, min_trials: int | None, allow_spec_change: bool, relative: bool,
            counters_only: bool, cross_host: bool, across_time: bool, verbose: bool) -> None:
    """Compare a candidate run with a baseline: exit 0 pass, 1 regression, 2 unusable input.
    Runs are gated host by host (timings only within a host, and only between runs made
    in one job: to gate two revisions' timings use `balloon-lab ab`); sides that share no
    host or job are unusable input unless --counters-only, --cross-host or --across-time
    says what to compare."""
    path = db_path or default_db_path()
    try:
        th = Thresholds.from_file(thresholds_file) if thresholds_file else Thresholds()
        th.add_cli(threshold_items)
        if alpha is not None:
            th.alpha = alpha
        if min_trials is not None:
            th.min_trials = min_trials
        result = gate_hosts(baseline, candidate, path, th, cross_host=cross_host, counters_only=counters_only,
                            across_time=across_time, allow_spec_change=allow_spec_change, relative=relative)
    except GateInputError as e:
        click.echo(f"balloon-lab gate: unusable input: {e}", err=True)
        if as_json:
            click.echo(json.dumps({"verdict": "unusable", "exit_code": EXIT_UNUSABLE, "error": str(e)}, indent=1))
        if junit:
            junit.write_text(_junit_error(str(e)))
        report_to_github("balloon-lab gate", f"### balloon-lab gate: unusable input (exit 2)\n\n{e}\n", [str(e)],
                         json_on_stdout=as_json)
        sys.exit(EXIT_UNUSABLE)
    _record_verdict(path, candidate, baseline, result)
    if junit:
        junit.write_text(result.to_junit())
    if as_json:
        click.echo(dumps(result.to_dict(), indent=1))
        click.echo(result.render_text(verbose=verbose), err=True)
    else:
        click.echo(result.render_text(verbose=verbose))
    report_to_github("balloon-lab gate", result.render_markdown(), result.regression_lines(), json_on_stdout=as_json)
    sys.exit(result.exit_code)
