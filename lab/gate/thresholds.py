"""How much change the gate allows: defaults, per-metric rules and the thresholds file.

A bare number is a fraction for timings and gauges and an absolute tolerance for
counters; `10%`, `exact` and `ignore` say it explicitly. The file (TOML, or JSON by
extension) holds alpha, timing, counter, timing_floor_ms, min_trials and a [metrics]
table of pattern = threshold; --threshold flags add rules after it (the last match wins).
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lab.results import metrics as lab_metrics
from lab.analysis import stats
from lab.gate.inputs import GateInputError

DEFAULT_TIMING_THRESHOLD = 0.10
# Practical significance: a timing must also be worse by at least this much in absolute
# terms. A sub-millisecond stage that moves by a fraction of a millisecond between two
# runs minutes apart is scheduling drift on a shared machine, not a regression (seen:
# 15 % false alarms in A/A runs from 1 ms stages drifting by 0.3 ms; see
# benchmarks/gate_false_positive.py).
DEFAULT_TIMING_FLOOR_MS = 1.0
_MS_IN = {"ns": 1e6, "us": 1e3, "ms": 1.0, "s": 1e-3}
DEFAULT_COUNTER_TOLERANCE = 0.0


@dataclass(frozen=True)
class Limit:
    """How much change a metric may show: relative (fraction of the baseline median),
    absolute (counters only), or ignore (not gated)."""

    mode: str  # relative | absolute | ignore
    value: float = 0.0

    @classmethod
    def parse(cls, raw: Any, *, what: str) -> "Limit":
        if isinstance(raw, str):
            text = raw.strip().lower()
            if text in ("ignore", "off", "skip"):
                return cls("ignore")
            if text == "exact":
                return cls("absolute", 0.0)
            m = re.fullmatch(r"\+?(\d+(?:\.\d+)?)\s*%", text)
            if m:
                return cls("relative", float(m.group(1)) / 100.0)
            try:
                raw = float(text)
            except ValueError:
                raise GateInputError(f"threshold for {what}: cannot read {raw!r} (use e.g. 10%, 0.1, 2, "
                                     "exact or ignore)") from None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
            raise GateInputError(f"threshold for {what}: {raw!r} is not a non-negative number, a percentage, "
                                 "exact or ignore")
        return cls("number", float(raw))

    def for_kind(self, kind: str) -> "Limit":
        """A bare number is a fraction for timings and gauges, an absolute tolerance for counters."""
        if self.mode != "number":
            return self
        return Limit("relative" if lab_metrics.is_statistical(kind) else "absolute", self.value)

    def describe(self, kind: str, metric: str | None = None) -> str:
        """The limit as the gate prints it: "+10%" (worse = higher), "-10%" for a metric
        whose declared better side is higher, "exact", "±2" for counters."""
        lim = self.for_kind(kind)
        if lim.mode == "ignore":
            return "ignored"
        if lab_metrics.is_statistical(kind):
            sign = "-" if metric is not None and lab_metrics.better(metric) == lab_metrics.HIGHER else "+"
            return f"{sign}{lim.value:.0%}" if lim.mode == "relative" else f"{sign}{lim.value:g}"
        if lim.value == 0:
            return "exact"
        return f"±{lim.value:.0%}" if lim.mode == "relative" else f"±{lim.value:g}"


@dataclass
class Thresholds:
    """Defaults plus per-metric rules; for a metric the LAST matching rule wins
    (file rules first, then --threshold flags), so put general patterns first."""

    alpha: float = stats.ALPHA
    timing: Limit = Limit("relative", DEFAULT_TIMING_THRESHOLD)
    counter: Limit = Limit("absolute", DEFAULT_COUNTER_TOLERANCE)
    rules: list[tuple[str, Limit]] = field(default_factory=list)
    timing_floor_ms: float = DEFAULT_TIMING_FLOOR_MS
    min_trials: int | None = None  # ok measured trials each baseline arm needs in the candidate (None: all)

    def floor(self, metric: str) -> float:
        """The smallest absolute worsening of a timing that counts, in the metric's unit."""
        return self.timing_floor_ms * _MS_IN.get(lab_metrics.unit(metric), 0.0)

    def limit(self, metric: str, kind: str) -> Limit:
        lim = self.timing if lab_metrics.is_statistical(kind) else self.counter
        for pattern, rule in self.rules:
            if fnmatch.fnmatchcase(metric, pattern):
                lim = rule
        return lim.for_kind(kind)

    def add_cli(self, items: Sequence[str]) -> "Thresholds":
        """Rules from --threshold METRIC=VALUE (METRIC may be a glob pattern)."""
        for item in items:
            pattern, sep, value = item.partition("=")
            if not sep or not pattern.strip():
                raise GateInputError(f"--threshold {item!r}: expected METRIC=VALUE, e.g. stages_ns.inflate.total=15%")
            self.rules.append((pattern.strip(), Limit.parse(value, what=pattern.strip())))
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "Thresholds":
        """TOML (or JSON, by extension): alpha, timing, counter, and a [metrics] table of
        pattern = threshold."""
        p = Path(path)
        try:
            text = p.read_text()
            doc = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise GateInputError(f"thresholds file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GateInputError(f"cannot read thresholds file {p}: {e}") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise GateInputError(f"thresholds file {p} is malformed: {e}") from None
        if not isinstance(doc, dict):
            raise GateInputError(f"thresholds file {p} must hold a table")
        unknown = set(doc) - {"alpha", "timing", "counter", "metrics", "timing_floor_ms", "min_trials"}
        if unknown:
            raise GateInputError(f"thresholds file {p}: unknown key(s) {', '.join(sorted(unknown))} "
                                 "(allowed: alpha, timing, counter, metrics, timing_floor_ms, min_trials)")
        th = cls()
        if "min_trials" in doc:
            n = doc["min_trials"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise GateInputError(f"thresholds file {p}: min_trials must be an integer >= 1, got {n!r}")
            th.min_trials = n
        if "alpha" in doc:
            a = doc["alpha"]
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
                raise GateInputError(f"thresholds file {p}: alpha must be a number in (0, 1), got {a!r}")
            th.alpha = float(a)
        if "timing_floor_ms" in doc:
            f = doc["timing_floor_ms"]
            if isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0:
                raise GateInputError(f"thresholds file {p}: timing_floor_ms must be a number >= 0, got {f!r}")
            th.timing_floor_ms = float(f)
        if "timing" in doc:
            th.timing = Limit.parse(doc["timing"], what="timing (default)").for_kind(lab_metrics.TIMING)
        if "counter" in doc:
            th.counter = Limit.parse(doc["counter"], what="counter (default)").for_kind(lab_metrics.COUNTER)
        rules = doc.get("metrics", {})
        if not isinstance(rules, dict):
            raise GateInputError(f"thresholds file {p}: [metrics] must be a table of pattern = threshold")
        th.rules += [(k, Limit.parse(v, what=k)) for k, v in rules.items()]
        return th

    def describe(self) -> str:
        return (f"timings/gauges worse by more than {self.timing.describe(lab_metrics.TIMING)} with Holm p < {self.alpha:g}"
                f" (timings also by >= {self.timing_floor_ms:g} ms); "
                f"counters {self.counter.describe(lab_metrics.COUNTER)}; every baseline arm needs "
                + (f">= {self.min_trials}" if self.min_trials else "all its")
                + " ok measured trials in the candidate"
                + (f"; {len(self.rules)} per-metric rule(s)" if self.rules else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "timing": asdict(self.timing), "counter": asdict(self.counter),
                "timing_floor_ms": self.timing_floor_ms, "min_trials": self.min_trials,
                "rules": [{"pattern": p, **asdict(l)} for p, l in self.rules]}
