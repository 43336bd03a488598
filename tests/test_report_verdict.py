"""The report's verdict cannot be misread: a winner only when it is told apart from
the runner-up, "a tie" otherwise; the compact table hides rows equal everywhere.
On real SQLite stores with runs of known distributions (tests/test_gate.py's make_run)."""
from __future__ import annotations

import re

from lab.trials.spec import ExperimentSpec
from lab.store.store import Store
from lab.cli import report_data as data
from reports.html import build
from test_gate import make_run

SPEC = ExperimentSpec(name="verdict", arms=["pfn", "bitmap", "chunks"], trials=10, warmups=0, probes=False,
                      guest_mib=1024, inflate_mib=512)


def _verdict(tmp_path, medians: dict[str, float]) -> tuple[str, str]:
    with Store(tmp_path / "lab.db") as s:
        run = make_run(s, medians=medians, seed=3, spec=SPEC)
        html = build(data.load(s, run)).html
    v = html[html.index('<section id="verdict">'):html.index('<section id="comparison">')]
    return re.sub(r"<[^>]+>", "", v), html


def test_clear_winner_is_named(tmp_path):
    text, _ = _verdict(tmp_path, {"pfn": 4e9, "bitmap": 6e8, "chunks": 3e8})
    assert "Inflating 512 MiB: chunks is fastest" in text and "a tie" not in text


def test_indistinguishable_arms_are_a_tie(tmp_path):
    # chunks vs bitmap 1.01x with 5 % noise: not distinguishable, as in the 1.01x, p = 0.14
    text, html = _verdict(tmp_path, {"pfn": 4e9, "bitmap": 6.06e8, "chunks": 6e8})
    assert "is fastest" not in text
    assert re.search(r"Inflating 512 MiB: a tie between (chunks|bitmap) [\d.]+ ms, (bitmap|chunks) [\d.]+ ms", text)
    assert "Not distinguishable" in text and "pfn" in text.split("Against the others")[1]
    # compact table: one line per metric; `pages` is the same in every trial of every arm, so no row
    compact = html[html.index('class="cmp compact"'):html.index("Full table")]
    assert "<code>pages</code>" not in compact and "<code>runs</code>" in compact
    assert "metrics with one value in every trial of every arm" in html
