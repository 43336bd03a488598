"""Export and history, for notebooks and trends: a real small `compare` exported to
CSV/Parquet and read back by pandas into exactly `show`'s medians; the history of a
metric across stored runs of one experiment, with the runs the gate flagged marked,
in `balloon-lab history` and in the report."""
from __future__ import annotations

import json
import math
import subprocess

import pandas as pd
import pytest
from click.testing import CliRunner

from lab.cli.group import main
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store
from test_gate import make_run

from conftest import BALLOON_LAB  # noqa: E402  (this checkout's CLI, or BALLOON_LAB_UNDER_TEST)


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    db = tmp_path_factory.mktemp("export") / "lab.db"
    out = subprocess.run([BALLOON_LAB, "compare", "--guest-mib", "128", "--inflate-mib", "64", "--arms", "pfn,chunks",
                          "--trials", "3", "--warmups", "1", "--no-probes", "--quiet", "--db", str(db)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return db


def test_export_csv_read_by_pandas_gives_shows_medians(compared, tmp_path):
    csv = tmp_path / "run.csv"
    r = cli("export", "latest", "--db", str(compared), "-o", str(csv))
    assert r.exit_code == 0, r.stderr
    df = pd.read_csv(csv)
    assert tuple(df.columns) == ("run_id", "run_name", "trial", "arm", "round", "warmup", "status", "metric", "kind",
                                 "unit", "value")
    assert df.warmup.dtype == bool and set(df.status) == {"ok"} and df.warmup.sum() > 0
    assert set(df.unit.dropna()) <= {"ns", "us", "ms", "s", "bytes", "count"}
    assert df[df.metric == "stages_ns.inflate.total"].unit.unique().tolist() == ["ns"]
    ok = df[(df.status == "ok") & ~df.warmup]
    med = ok.groupby(["arm", "metric"]).value.median()
    shown = json.loads(cli("show", "latest", "--db", str(compared), "--json").stdout)["comparison"]["summaries"]
    assert len(shown) > 50
    for s in shown:                          # every median show prints, equal to pandas' from the export
        assert math.isclose(med[(s["arm"], s["metric"])], s["median"], rel_tol=0, abs_tol=0), s
    pq = tmp_path / "run.parquet"
    assert cli("export", "latest", "--db", str(compared), "--format", "parquet", "-o", str(pq)).exit_code == 0
    p = pd.read_parquet(pq)
    assert len(p) == len(df) and (p.value.fillna(-1).to_numpy() == df.value.fillna(-1).to_numpy()).all()


def test_history_marks_the_run_the_gate_flagged_and_the_report_plots_it(tmp_path):
    db = tmp_path / "lab.db"
    spec = ExperimentSpec(name="hist", arms=["pfn", "bitmap"], trials=5, warmups=0, probes=False)
    other = ExperimentSpec(name="other", arms=["pfn", "bitmap"], trials=5, warmups=0, probes=False, seed=9)
    with Store(db) as s:
        runs = [make_run(s, medians={"pfn": 4e9, "bitmap": m}, seed=i, n=5, spec=spec)
                for i, m in enumerate((6e8, 6.1e8, 9e8))]
        make_run(s, medians={"pfn": 4e9, "bitmap": 6e8}, seed=5, n=5, spec=other)   # another experiment
    g = cli("gate", "--baseline", runs[0], "--candidate", runs[2], "--db", str(db), "--threshold",
            "inflate.stages_ns.total=10%")
    assert g.exit_code == 1, g.output                      # bitmap got 1.5x slower
    h = cli("history", "inflate.stages_ns.total", "--arm", "bitmap", "--run", runs[0], "--db", str(db))
    assert h.exit_code == 0, h.stderr
    lines = [ln for ln in h.stdout.splitlines() if ln.strip().startswith(("!", "run")) or runs[0] in ln]
    assert "across 3 runs" in h.stdout
    flagged = [ln for ln in h.stdout.splitlines() if ln.startswith("!")]
    assert len(flagged) == 2 and all(runs[2] in ln for ln in flagged) and lines
    pts = json.loads(cli("history", "inflate.stages_ns.total", "--run", runs[1], "--db", str(db), "--json").stdout)
    assert [p["run_id"] for p in pts if p["arm"] == "pfn"] == runs
    assert [bool(p["flagged"]) for p in pts if p["arm"] == "bitmap"] == [False, False, True]
    out = tmp_path / "r.html"
    assert cli("report", runs[1], "--db", str(db), "-o", str(out)).exit_code == 0
    html = out.read_text()
    section = html[html.index('<section id="history">'):html.index('<section id="environment">')]
    assert 'id="plot-history"' in section and "<svg" in section
    assert "gate: regression" in section and runs[2] in section and "(this run)" in section
    assert cli("history", "nope.metric", "--db", str(db)).exit_code == 2
