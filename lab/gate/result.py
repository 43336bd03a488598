"""The gate's answer: one Check per arm and metric, and the verdict with its exit code,
as text, JSON or JUnit XML (one testcase per arm x metric) for CI systems."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import Any

from lab.gate.inputs import GateInput
from lab.gate.thresholds import Thresholds

EXIT_PASS, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2


@dataclass
class Check:
    arm: str
    metric: str
    kind: str
    status: str  # pass | regression | improvement | ignored | missing (new in the candidate) | duplicate
    limit: str
    n_baseline: int = 0
    n_candidate: int = 0
    baseline_median: float | None = None
    candidate_median: float | None = None
    ratio: float | None = None
    ratio_ci_low: float | None = None
    ratio_ci_high: float | None = None
    difference: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    cliffs_delta: float | None = None
    message: str = ""
    unit: str = "count"     # of baseline_median, candidate_median and difference (ratios have none)


@dataclass
class GateResult:
    baseline: GateInput
    candidate: GateInput
    thresholds: Thresholds
    checks: list[Check]
    notes: list[str]

    @property
    def regressions(self) -> list[Check]:
        return [c for c in self.checks if c.status == "regression"]

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.regressions else EXIT_PASS

    @property
    def verdict(self) -> str:
        return "regression" if self.regressions else "pass"

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("pass", "regression", "improvement", "ignored", "missing", "duplicate")}
        for c in self.checks:
            out[c.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "counts": self.counts(),
            "regressions": [asdict(c) for c in self.regressions],
            "checks": [asdict(c) for c in self.checks],
            "notes": self.notes,
        }

    def render_text(self, *, verbose: bool = False) -> str:
        counts = self.counts()
        gated = len(self.checks) - counts["ignored"] - counts["missing"] - counts["duplicate"]
        head = (f"gate: REGRESSION in {counts['regression']} of {gated} checks" if self.regressions
                else f"gate: PASS ({gated} checks, {counts['improvement']} improved)")
        lines = [head,
                 f"  baseline:  {self.baseline.describe()}",
                 f"  candidate: {self.candidate.describe()}",
                 f"  rule: {self.thresholds.describe()}"]
        shown = [c for c in self.checks if verbose or c.status in ("regression", "improvement")]
        for c in shown:
            lines.append(f"  {c.status.upper() if c.status == 'regression' else c.status:<11} {c.arm}  {c.metric}: "
                         f"{c.message}")
        missing = [c for c in self.checks if c.status == "missing"]
        if missing and not verbose:
            lines.append(f"  new: {len(missing)} metric(s) only in the candidate, not gated "
                         f"(e.g. {missing[0].arm} {missing[0].metric}); --json lists them")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_junit(self) -> str:
        """JUnit XML: one testcase per gated check, <failure> for a regression, <skipped>
        only for a metric a threshold rule ignores (really not checked). A metric whose
        samples are identical to another's is that one check (its testcase names it); a
        metric only the candidate has is no check (a property counts them)."""
        cases = [c for c in self.checks if c.status not in ("duplicate", "missing")]
        folded: dict[tuple[str, str], list[str]] = {}
        for c in self.checks:
            if c.status == "duplicate":
                folded.setdefault((c.arm, c.limit.removeprefix("as ")), []).append(c.metric)
        counts = self.counts()
        suites = ET.Element("testsuites", name="balloon-lab gate", tests=str(len(cases)),
                            failures=str(counts["regression"]), errors="0")
        suite = ET.SubElement(suites, "testsuite", name=f"balloon-lab gate: {self.candidate.name}",
                              tests=str(len(cases)), failures=str(counts["regression"]), errors="0",
                              skipped=str(counts["ignored"]), time="0")
        props = ET.SubElement(suite, "properties")
        for k, v in (("baseline", self.baseline.describe()), ("candidate", self.candidate.describe()),
                     ("rule", self.thresholds.describe()),
                     ("new_in_candidate", f"{counts['missing']} metric(s) only in the candidate, not gated"),
                     *((f"note{i}", n) for i, n in enumerate(self.notes))):
            ET.SubElement(props, "property", name=k, value=v)
        for c in cases:
            tc = ET.SubElement(suite, "testcase", classname=f"balloon-lab.gate.{c.arm}", name=c.metric, time="0")
            also = folded.get((c.arm, c.metric))
            out = f"{c.status}: {c.message}" + (f"\nthe same samples, so the same check: {', '.join(also)}"
                                                 if also else "")
            if c.status == "regression":
                f = ET.SubElement(tc, "failure", message=f"{c.metric} regressed in {c.arm}: {c.message}",
                                  type="regression")
                f.text = json.dumps(asdict(c), indent=1)
            elif c.status == "ignored":
                ET.SubElement(tc, "skipped", message=c.message or c.status)
            if c.status != "ignored":
                ET.SubElement(tc, "system-out").text = out
        ET.indent(suites)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
