"""The gate across hosts: timings are compared only within a host, counters anywhere.

A run's trials carry the id of the host that ran them (lab/machine/identity.py). Baseline and
candidate are paired host by host: host a's trials of the candidate against host a's
of the baseline, and so on; the verdict is the worst of the pairs. When the two sides
share no host the timings would compare two machines, not two versions, so the gate
refuses (exit 2) unless asked: --counters-only gates the exact counters (they do not
depend on the machine) and --cross-host gates everything anyway. `RUN@HOST` picks one
host of a run, so two hosts of one run can be compared that way too.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.results import metrics
from lab.gate.compare import run_gate
from lab.gate.inputs import GateInput, GateInputError, load_input
from lab.gate.result import GateResult
from lab.gate.thresholds import Thresholds
from lab.gate.same_job import one_job
from lab.gate.baseline_file import BaselineError, load_baseline
from lab.store.store import Store, StoreError


def split_ref(ref: str) -> tuple[str, str | None]:
    """'RUN@HOST' -> (RUN, HOST); a file path or a plain run ref -> (ref, None)."""
    if "@" in ref and not Path(ref).exists():
        run, _, host = ref.rpartition("@")
        if run and host:
            return run, host
    return ref, None


def hosts_of(ref: str, db_path: str | Path, side: str) -> list[str] | None:
    """Hosts whose trials the input holds; None when unknown (a baseline file exported
    before hosts were recorded)."""
    run_ref, host = split_ref(ref)
    if Path(ref).is_file():
        try:
            hid = load_baseline(ref).run.get("host_id")
        except BaselineError as e:
            raise GateInputError(f"{side}: {e}") from None
        return [hid] if hid else None
    if "/" in ref or ref.endswith(".json"):
        return None  # load_input names the missing file
    try:
        with Store(db_path, create=False) as store:
            hosts = store.get_run(run_ref).hosts
    except StoreError as e:
        raise GateInputError(f"{side}: {e}") from None
    if host is not None:
        if host not in hosts:
            raise GateInputError(f"{side}: run {run_ref} has no trials on host {host!r} (hosts: "
                                 f"{', '.join(hosts) or 'none'})")
        return [host]
    return hosts


def _counters_only(inp: GateInput) -> GateInput:
    table = {a: {m: v for m, v in ms.items() if metrics.classify(m) == metrics.COUNTER} for a, ms in inp.table.items()}
    rounds = None if inp.rounds is None else {a: {m: v for m, v in ms.items() if metrics.classify(m) == metrics.COUNTER}
                                              for a, ms in inp.rounds.items()}
    return GateInput(inp.ref, inp.source, inp.run_id, inp.name, inp.spec, inp.environment, table, rounds,
                     inp.outcomes, inp.span)


@dataclass
class HostsGateResult:
    """One GateResult per host pair; the verdict is the worst of them."""

    pairs: list[tuple[str, GateResult]]
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max(r.exit_code for _, r in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        if len(self.pairs) == 1:
            label, r = self.pairs[0]
            d = r.to_dict()
            d["host"] = label
            d["notes"] = self.notes + d["notes"]
            return d
        counts: dict[str, int] = {}
        checks, regressions = [], []
        for label, r in self.pairs:
            for k, v in r.counts().items():
                counts[k] = counts.get(k, 0) + v
            checks += [{"host": label, **asdict(c)} for c in r.checks]
            regressions += [{"host": label, **asdict(c)} for c in r.regressions]
        return {"verdict": "regression" if regressions else "pass", "exit_code": self.exit_code,
                "hosts": {label: r.to_dict() for label, r in self.pairs}, "counts": counts,
                "regressions": regressions, "checks": checks, "notes": self.notes}

    def render_text(self, *, verbose: bool = False) -> str:
        if len(self.pairs) == 1:
            label, r = self.pairs[0]
            return "\n".join([r.render_text(verbose=verbose), f"  host: {label}"] + [f"  note: {n}" for n in self.notes])
        bad = [label for label, r in self.pairs if r.regressions]
        head = (f"gate: REGRESSION on host(s) {', '.join(bad)}" if bad
                else f"gate: PASS on all {len(self.pairs)} hosts")
        out = [head] + [f"  note: {n}" for n in self.notes]
        for label, r in self.pairs:
            out += [f"\nhost {label}:"] + ["  " + line for line in r.render_text(verbose=verbose).splitlines()]
        return "\n".join(out)

    def regression_lines(self) -> list[str]:
        """One line per regression ("host: arm metric: message"), for annotations."""
        many = len(self.pairs) > 1
        return [f"{label + ': ' if many else ''}{c.arm} {c.metric}: {c.message}"
                for label, r in self.pairs for c in r.regressions]

    def render_markdown(self) -> str:
        """A CI step summary: the verdict, what was compared, every regression."""
        bad = self.regression_lines()
        head = "❌ REGRESSION (exit 1)" if bad else "✅ PASS (exit 0)"
        out = [f"### balloon-lab gate: {head}", ""]
        for label, r in self.pairs:
            n = r.counts()
            out.append(f"- host `{label}`: baseline {r.baseline.describe()}; candidate {r.candidate.describe()}; "
                       f"{n['pass'] + n['regression'] + n['improvement']} checks, {n['regression']} regressed, "
                       f"{n['improvement']} improved")
        out += [f"- **regression** {line}" for line in bad]
        out += [f"- note: {n}" for n in self.notes + [n for _l, r in self.pairs for n in r.notes]]
        return "\n".join(out) + "\n"

    def to_junit(self) -> str:
        if len(self.pairs) == 1:
            return self.pairs[0][1].to_junit()
        suites = ET.Element("testsuites", name="balloon-lab gate")
        tests = failures = 0
        for label, r in self.pairs:
            for suite in ET.fromstring(r.to_junit()).iter("testsuite"):
                suite.set("name", f"{suite.get('name')} [host {label}]")
                for tc in suite.iter("testcase"):
                    tc.set("classname", f"{tc.get('classname')}@{label}")
                tests += int(suite.get("tests", 0))
                failures += int(suite.get("failures", 0))
                suites.append(suite)
        suites.set("tests", str(tests))
        suites.set("failures", str(failures))
        suites.set("errors", "0")
        ET.indent(suites)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def gate_hosts(baseline: str, candidate: str, db_path: str | Path, thresholds: Thresholds | None = None, *,
               cross_host: bool = False, counters_only: bool = False, across_time: bool = False,
               **kw: Any) -> HostsGateResult:
    """Gate candidate against baseline host by host (see the module docstring);
    GateInputError (exit 2) for a timing comparison nobody asked for: across hosts, or
    between runs not made in one job (lab/gate_time.py)."""
    bh, ch = hosts_of(baseline, db_path, "baseline"), hosts_of(candidate, db_path, "candidate")
    b_ref, b_host = split_ref(baseline)
    c_ref, c_host = split_ref(candidate)
    notes: list[str] = []
    if bh is None or ch is None:
        unknown = " and ".join(s for s, h in (("baseline", bh), ("candidate", ch)) if h is None)
        notes.append(f"the {unknown} recorded no host: host of the timings not checked")
        pairs = [(b_host or c_host or "unknown", load_input(b_ref, db_path, "baseline", b_host),
                  load_input(c_ref, db_path, "candidate", c_host))]
    else:
        common = [h for h in bh if h in ch]
        if common:
            for side, hosts in (("baseline", bh), ("candidate", ch)):
                only = [h for h in hosts if h not in common]
                if only:
                    notes.append(f"host(s) only in the {side}, not gated: {', '.join(only)}")
            pairs = [(h, load_input(b_ref, db_path, "baseline", h), load_input(c_ref, db_path, "candidate", h))
                     for h in common]
        else:
            if not (cross_host or counters_only):
                raise GateInputError(
                    f"baseline ran on host(s) {', '.join(bh)}, candidate on {', '.join(ch)}: timings are compared "
                    "only within a host. Pass --counters-only to gate the exact counters across hosts, or "
                    "--cross-host to gate the timings anyway")
            label = f"{','.join(bh)} vs {','.join(ch)}"
            notes.append(f"cross-host comparison ({label}): "
                         + ("exact counters only" if counters_only and not cross_host else
                            "timings of different hosts compared, as asked"))
            pairs = [(label, load_input(b_ref, db_path, "baseline", b_host),
                      load_input(c_ref, db_path, "candidate", c_host))]
    if not counters_only:
        for _label, b, c in pairs:
            same, why = one_job(b.environment, b.span, c.environment, c.span)
            if same:
                continue
            if not across_time:
                raise GateInputError(
                    f"baseline and candidate were not made in one job ({why}): timings are not comparable here "
                    "between runs made at different times (the kernel's own cost drifts ~15 % in tens of "
                    "minutes). Gate two revisions with `balloon-lab ab`; pass --counters-only to gate the exact "
                    "counters, or --across-time to gate the timings anyway")
            notes.append(f"timings of runs not made in one job ({why}) compared, as asked")
            break
    if counters_only:
        pairs = [(label, _counters_only(b), _counters_only(c)) for label, b, c in pairs]
        if not cross_host:
            notes.append("counters only: timings and gauges not gated")
    same_host = b_host == c_host if bh is None or ch is None else any(h in ch for h in bh)
    results = []
    for label, b, c in pairs:
        if b.run_id is not None and b.run_id == c.run_id and same_host:
            raise GateInputError(f"--baseline and --candidate are the same run {b.run_id}: a run gated "
                                 "against itself always passes")
        try:
            results.append((label, run_gate(b, c, thresholds, **kw)))
        except GateInputError as e:
            raise GateInputError(f"host {label}: {e}" if len(pairs) > 1 else str(e)) from None
    return HostsGateResult(results, notes)
