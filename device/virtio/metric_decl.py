"""Metric declarations: each counter, timing and gauge declared once, with its kind,
unit and a one-line doc, next to the counters it describes (Firecracker's metrics.rs:
one documented field per counter).

The device, the guest driver, the transport and the probes each declare their own
metrics with `Metric`; the counters still cross processes as plain dicts, and the lab
(lab/results/metric_catalog.py) reads these declarations to know how each stored metric is
compared, instead of guessing from its name. This module lives in device/virtio
because every side may import it: device/vmm, device/guest, probes and lab.

Kinds (the lab's statistics treat them differently; the store's `metrics.kind` column
holds one of them):
- "counter": determined by the protocol and the seed; compared exactly.
- "timing": a duration; noisy, compared statistically, lower is better.
- "gauge": a count the kernel keeps for whole processes or that depends on scheduling
  (RSS, page faults, kicks under EVENT_IDX); noisy, compared like timings.
A name is a dotted path relative to the record that holds it; a "*" segment stands
for any one key of a map (a queue index, a refusal reason, a stage name).

Directions (which way is better; the gate, `ab` and the report read them):
- "lower": lower is better (the default of timings and gauges: time, memory, faults);
- "higher": higher is better (throughputs, work a background workload got done);
- "exact": must not change (the default of counters);
- "zero": must be 0 (a correctness figure: corrupted pages, data left in the balloon).
A metric whose direction is not its kind's default declares it (`better=HIGHER`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

COUNTER = "counter"
TIMING = "timing"
GAUGE = "gauge"
KINDS = (TIMING, GAUGE, COUNTER)
# "" is a count (pages, calls, requests) or a ratio; the rates are throughputs.
UNITS = ("", "ns", "us", "ms", "s", "bytes", "Gbit/s", "MiB/s")
WILDCARD = "*"
LOWER, HIGHER, EXACT, ZERO = "lower", "higher", "exact", "zero"
DIRECTIONS = (LOWER, HIGHER, EXACT, ZERO)


class UndeclaredMetric(KeyError):
    """A metric name no declaration covers: declare it beside the counter it names."""

    def __str__(self) -> str:     # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Metric:
    """One declared metric: its name (relative to its record), kind, unit, doc line and
    direction (`better`; "" takes the kind's default: lower for timings and gauges,
    exact for counters)."""

    name: str
    kind: str
    unit: str
    doc: str
    better: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not self.better:
            object.__setattr__(self, "better", EXACT if self.kind == COUNTER else LOWER)
        if self.better not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: direction {self.better!r} is not one of {DIRECTIONS}")
        if self.better in (LOWER, HIGHER) and self.kind == COUNTER:
            raise ValueError(f"metric {self.name!r}: a counter is compared exactly; it cannot be {self.better}-better")
        if self.unit not in UNITS:
            raise ValueError(f"metric {self.name!r}: unit {self.unit!r} is not one of {UNITS}")
        if not self.doc or "\n" in self.doc:
            raise ValueError(f"metric {self.name!r}: needs a one-line doc")
        if not self.name or any(not part for part in self.name.split(".")):
            raise ValueError(f"metric name {self.name!r}: dotted path of non-empty keys")

    def under(self, prefix: str) -> "Metric":
        """The same metric as it appears inside a larger record, at `prefix`."""
        return dataclasses.replace(self, name=f"{prefix}.{self.name}" if prefix else self.name)

    def matches(self, name: str) -> bool:
        mine, theirs = self.name.split("."), name.split(".")
        return len(mine) == len(theirs) and all(m == WILDCARD or m == t for m, t in zip(mine, theirs))


class MetricSet:
    """The metrics one record declares (a counters dataclass, a report dict), by name."""

    def __init__(self, owner: str, metrics: Iterable[Metric]) -> None:
        self.owner = owner              # where the declarations live, for error messages
        self.metrics: dict[str, Metric] = {}
        for m in metrics:
            if m.name in self.metrics:
                raise ValueError(f"{owner}: metric {m.name!r} declared twice")
            self.metrics[m.name] = m

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.metrics.values())

    def __len__(self) -> int:
        return len(self.metrics)

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    def __getitem__(self, name: str) -> Metric:
        return self.metrics[name]

    def names(self) -> list[str]:
        return list(self.metrics)

    def under(self, prefix: str) -> list[Metric]:
        """Every declaration, renamed to where the record sits inside a larger one."""
        return [m.under(prefix) for m in self]

    def lookup(self, name: str) -> Metric:
        """The declaration covering `name` (exact names win over wildcards)."""
        m = self.metrics.get(name)
        if m is not None:
            return m
        for m in self.metrics.values():
            if WILDCARD in m.name and m.matches(name):
                return m
        raise UndeclaredMetric(f"metric {name!r} is not declared in {self.owner}: declare it there "
                               f"(device/virtio/metric_decl.Metric: name, kind, unit, doc)")

    def check(self, values: Mapping[str, Any], prefix: str = "") -> None:
        """Raise UndeclaredMetric for any number in `values` (nested dicts walked) that
        no declaration covers: what crosses a process boundary as a dict is declared.
        Histograms ({bucket: count} under a key ending in "hist") are not metrics."""
        for key, value in values.items():
            name = f"{prefix}{key}"
            if str(key).endswith("hist"):
                continue
            if isinstance(value, Mapping):
                self.check(value, name + ".")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.lookup(name)


def numeric_fields(cls: type) -> list[str]:
    """The public int/float fields of a dataclass: the counters it holds."""
    out = []
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if not f.name.startswith("_") and kind.split(" ")[0] in ("int", "float"):
            out.append(f.name)
    return out


def declared_by(metrics: MetricSet):
    """Class decorator: every public int/float field of the dataclass is declared in
    `metrics` (checked at import, so a new counter cannot go undeclared)."""
    def check(cls: type) -> type:
        missing = [n for n in numeric_fields(cls) if n not in metrics]
        if missing:
            raise TypeError(f"{cls.__name__}: counters {missing} are not declared in {metrics.owner}")
        cls.METRICS = metrics
        return cls
    return check
