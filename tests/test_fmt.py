"""The one number formatter: counts whole and grouped, units chosen from the data,
never scientific notation (the issue's `4.597e+05 [459657, 459847]`, `1.175e+04 us`)."""
from __future__ import annotations

import re

from hypothesis import given, strategies as st

from device.virtio.metric_decl import TIMING, Metric
from lab.results.metric_catalog import declare
from lab.analysis.stats import value_formatter
from fmt.numbers import fmt_count, fmt_ratio, fmt_si, fmt_value, plural, row_formatter, sig, speed_phrase

SCI = re.compile(r"\d[eE][+-]?\d")


@given(st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_never_scientific(v):
    for text in (sig(v), fmt_count(v), fmt_si(v, "bit/s"), fmt_value(v, ""), fmt_value(v, "ns"),
                 fmt_value(v, "bytes"), row_formatter("us", [v, 1.0])(v), fmt_ratio(abs(v)),
                 speed_phrase(abs(v))):
        assert not SCI.search(text), text


def test_the_issues_numbers():
    declare(Metric("inflate.wall_us", TIMING, "us", "a timing in microseconds (this test's own)"))
    assert value_formatter("probes.page_faults", [459657.0, 459847.0])(459657.0) == "459 657"
    assert value_formatter("probes.page_allocs", [459657.5])(459657.5) == "459 657.5"
    assert value_formatter("inflate.wall_us", [11750.0])(11750.0) == "11.8 ms"
    assert value_formatter("deflate.memfd_bytes_after", [117440512])(117440512) == "112 MiB"
    assert fmt_value(5326766080, "bytes") == "4.96 GiB"
    assert fmt_count(131072) == "131 072"
    assert fmt_si(10e9, "bit/s") == "10 Gbit/s"
    assert plural(1, "trial") == "1 trial" and plural(3, "trial") == "3 trials"
    assert row_formatter("bytes", [131072, 96])(96) == "96 B"      # far below the row's KiB: its own unit
    assert fmt_ratio(6 / 131072) == "0.0000458×" and speed_phrase(590 / 4126) == "6.99× faster"
