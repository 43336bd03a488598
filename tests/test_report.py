"""The HTML report from real trials in a real SQLite store (tests/test_report_browser.py
opens one in Chromium). Trials here run without probes, so the report's "no probe data"
path is exercised for real; the browser test covers the probe histograms."""
from __future__ import annotations

import re
import subprocess

import pytest

from lab.trials.experiment import run_experiment
from lab.trials.arm_trial import run_trial
from lab.trials.spec import ExperimentSpec
from lab.store.store import Store
from reports import charts
from lab.cli import report_data as data
from reports.html import build, write_report
from reports.palette import ARM_COLORS, arm_colors
from lab.trials.spec import NO_PROBES_SUFFIX
from reports.section_parts import vfmt

from conftest import BALLOON_LAB  # noqa: E402  (this checkout's CLI, or BALLOON_LAB_UNDER_TEST)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Two arms, two real trials each (64 MiB guests, no probes): the smallest run
    that still has a baseline, a comparison and every non-probe section. Starting
    real VMM and guest processes takes a few seconds each, hence the slow marks."""
    db = tmp_path_factory.mktemp("report") / "lab.db"
    spec = ExperimentSpec(arms=["pfn", "chunks"], guest_mib=64, inflate_mib=32, trials=2, warmups=0,
                          probes=False)
    with Store(db) as store:
        run_id = run_experiment(spec, lambda s, arm, rnd: run_trial(s, arm, None), store, progress=False)
    return db, run_id


@pytest.fixture(scope="module")
def real_report(real_run):
    db, run_id = real_run
    with Store(db) as store:
        d = data.load(store, run_id[:6])                    # a unique prefix works like the id
        trials = store.trials(run_id)
    return d, build(d), trials


def _attrs(html: str, name: str) -> list[str]:
    return re.findall(rf'\b{name}="([^"]*)"', html)


@pytest.mark.slow
def test_report_of_a_real_run_has_every_section_and_nothing_external(real_run, real_report):
    _db, run_id = real_run
    _d, rep, _trials = real_report
    html = rep.html
    assert rep.run_id == run_id
    assert rep.sections == ["verdict", "comparison", "stages", "probes", "run-lengths", "notifications",
                            "hosts", "environment", "reproduce"]
    for s in rep.sections:
        assert f'<section id="{s}">' in html
    # charts that need no probes are there, each an inline SVG with its own id prefix
    for cid in ("plot-totals", "plot-stages-inflate", "plot-stages-deflate", "plot-stage-shares",
                "plot-run-length", "plot-kicks-per-mib"):
        assert cid in rep.charts
        m = re.search(rf'<figure class="plot" id="{cid}" data-format="svg"><svg (.*?)</svg>', html, re.S)
        assert m and len(m.group(1)) > 2000, cid
    # probes were off: the probe plots say so instead of vanishing
    for cid in ("plot-madvise-len", "plot-madvise-ns", "plot-page-alloc-order"):
        assert cid not in rep.charts
        assert f'id="{cid}-missing"' in html
        assert any(m.startswith(cid) and "probes were off" in m for m in rep.missing)
    assert "no probe data: probes were off for this run" in html
    # self-contained: no script, every reference is in-document or a data: URI
    assert "<script" not in html.lower()
    refs = _attrs(html, "src") + _attrs(html, "href") + _attrs(html, "xlink:href")
    assert refs and all(r.startswith(("#", "data:")) for r in refs), [r for r in refs if not r.startswith(("#", "data:"))]
    assert not re.search(r"url\((?!#)", html)             # no CSS url() to anything but SVG ids
    assert "@import" not in html and "@font-face" not in html
    assert "default-src 'none'" in html                   # and a CSP forbidding any load
    # ids unique across the many inline SVGs (they share one document)
    ids = _attrs(html, "id")
    assert len(ids) == len(set(ids))
    # every in-document reference resolves
    targets = set(ids)
    for r in _attrs(html, "href") + _attrs(html, "xlink:href") + re.findall(r"url\(#([^)]+)\)", html):
        r = r.lstrip("#")
        if r and not r.startswith("data:"):
            assert r in targets, r


@pytest.mark.slow
def test_report_numbers_match_the_store(real_report):
    d, rep, trials = real_report
    html = rep.html
    assert d.arms == ["pfn", "chunks"] and d.baseline == "pfn"
    # two trials per arm cannot separate the arms: the verdict says so and lists the medians
    m = d.stage_metric("inflate", "total")
    med = {a: d.median(a, m) for a in d.arms}
    assert re.search(r"Inflating 32 MiB: <b>no verdict</b>, too few trials", html)
    assert "is fastest" not in html
    for a in d.arms:
        assert re.search(rf"{a}</span> {re.escape(vfmt(d.metric_unit(m))(med[a]))}", html), a
    # exact counters appear as stored: pfn discards once per page
    pfn = [t.result for t in trials if t.arm == "pfn"]
    assert all(r["discard_calls"] == r["pages"] == 8192 for r in pfn)
    assert "8 192" in html
    # the published figures sit beside ours
    for text in ("4 126 ms", "590 ms", "491 ms", "68.3 %", "VIRTIO_BALLOON_F_SG patch v12"):
        assert text in html
    # the command that reproduces the run, exactly as stored
    assert trials and d.run.command_line.startswith("balloon-lab compare ")
    assert f'<pre class="cmd" id="reproduce-command">{d.run.command_line}</pre>' in html
    # environment of the run
    assert d.run.environment["kernel"] in html and d.run.environment["python_version"] in html
    # too few trials for significance: the verdict says so rather than claiming a winner is sure
    assert "too few trials" in html


@pytest.mark.slow
def test_cli_writes_the_file_and_refuses_unknown_runs(real_run, tmp_path):
    db, run_id = real_run
    out = tmp_path / "sub" / "r.html"
    p = subprocess.run([BALLOON_LAB, "report", run_id, "-o", str(out), "--db", str(db)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "does not exist" in p.stderr     # no directory made behind the user's back
    assert not out.parent.exists()
    out.parent.mkdir()
    p = subprocess.run([BALLOON_LAB, "report", run_id, "-o", str(out), "--db", str(db)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.exists() and out.stat().st_size > 50_000
    assert f"wrote {out}" in p.stderr and "not shown: plot-madvise-len" in p.stderr
    assert out.read_text().startswith("<!DOCTYPE html>")
    p = subprocess.run([BALLOON_LAB, "report", "ffffffffffff", "-o", str(tmp_path / "x.html"), "--db", str(db)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no run 'ffffffffffff'" in p.stderr
    assert not (tmp_path / "x.html").exists()
    p = subprocess.run([BALLOON_LAB, "report", "latest", "--db", str(tmp_path / "none.db")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no results database" in p.stderr


def test_run_without_trials_and_run_with_only_failed_trials(tmp_path):
    """Degrades to sentences, never to a traceback or an empty page."""
    spec = ExperimentSpec(arms=["pfn", "bitmap"], guest_mib=64, inflate_mib=32, trials=1, warmups=0, probes=False)
    # a migration spec through the balloon runner: every trial fails, for real, in lab.trials.model.runner
    mig = ExperimentSpec(kind="migrate", arms=["none", "bitmap"], guest_mib=64, inflate_mib=0, trials=1, warmups=0,
                         probes=False)
    with Store(tmp_path / "lab.db") as store:
        empty = store.create_run(spec, environment={"kernel": "k"})
        failed = run_experiment(mig, lambda s, arm, rnd: run_trial(s, arm, None), store, progress=False)
        r1 = write_report(data.load(store, empty), tmp_path / "empty.html")
        r2 = write_report(data.load(store, failed), tmp_path / "failed.html")
    assert "No verdict: the run has no trials yet" in r1.html and "No comparison" in r1.html
    assert r1.charts == [] and "no stage timings" in r1.html.lower()
    assert "this run is running" in r1.html or "this run is interrupted" in r1.html
    assert "No verdict: no measured trial succeeded" in r2.html
    assert "Failed trials (2)" in r2.html and "this run is failed" in r2.html
    assert "run_trial runs balloon experiments" in r2.html          # the runner's own error, shown
    assert '<section id="migration">' in r2.html and "No migration results in this run yet" in r2.html
    assert (tmp_path / "failed.html").read_text() == r2.html


def test_colours_are_fixed_per_arm_and_distinct():
    c = arm_colors(["chunks", "pfn", "bitmap", "pfn/no-probes", "mystery", "other"], NO_PROBES_SUFFIX)
    assert c["pfn"] == ARM_COLORS["pfn"] and c["chunks"] == ARM_COLORS["chunks"]
    assert c == {**c, **arm_colors(["pfn", "chunks"], NO_PROBES_SUFFIX)}        # position does not change a colour
    assert len(set(c.values())) == len(c)                     # no two arms share one
    assert c["pfn/no-probes"] != c["pfn"]


def test_svg_ids_are_prefixed_and_png_fallback_for_huge_charts():
    import numpy as np

    fig = charts.new_figure(4, 3)
    ax = fig.subplots()
    ax.plot(np.arange(100), np.arange(100) ** 2, marker="o")
    ax.set_yscale("log")
    svg = charts.render(fig, "plot-a", "a chart").html
    ids = _attrs(svg, "id")
    assert ids and all(i.startswith("plot-a-") for i in ids)
    refs = re.findall(r'href="#([^"]+)"', svg) + re.findall(r"url\(#([^)]+)\)", svg)
    assert refs and all(r in ids for r in refs)
    assert "<style" not in svg and "<?xml" not in svg and "<metadata" not in svg
    big = charts.render(fig, "plot-b", "a chart", max_svg_bytes=1000)
    assert big.fmt == "png" and big.html.startswith('<img class="chart"') and "data:image/png;base64," in big.html


@pytest.mark.slow
def test_migration_run_gets_its_own_section_with_a_timeline(tmp_path):
    """A real (small) migration experiment: no hints against FREE_PAGE_HINT."""
    from lab.trials.model.migrate_runner import run_trial as migrate_trial

    spec = ExperimentSpec(kind="migrate", arms=["none", "upstream"], guest_mib=128, inflate_mib=0, trials=1,
                          warmups=0, probes=False)
    with Store(tmp_path / "lab.db") as store:
        run_id = run_experiment(spec, lambda s, arm, rnd: migrate_trial(s, arm, rnd), store, progress=False)
        rep = write_report(data.load(store, run_id), tmp_path / "m.html")
        trials = store.trials(run_id)
    assert [t.status for t in trials] == ["ok", "ok"], [t.error for t in trials]
    html = rep.html
    # a migration's sections: no inflate stages, run lengths or balloon kicks
    assert rep.sections == ["verdict", "comparison", "migration", "probes", "history", "hosts", "environment", "reproduce"]
    assert {"plot-totals", "plot-migration-bars", "plot-migration-timeline"} <= set(rep.charts)
    # one trial per design cannot name a winner: the verdict says so and gives both medians
    assert "Migrating a 128 MiB guest: <b>no verdict</b>, too few trials" in html
    assert "Downtime: <b>no verdict</b>" in html
    none = next(t.result for t in trials if t.arm == "none")
    up = next(t.result for t in trials if t.arm == "upstream")
    assert up["pages_hinted"] > 0 and none["pages_hinted"] == 0
    assert f"{up['pages_hinted']:,}".replace(",", " ") in html        # the hinted pages, as measured
    assert "2970 → 620 ms = 0.21" in html                             # the published ratio beside ours
    assert "FREE_PAGE_HINT v37 cover letter (2018)" in html
    assert trials[0].result["per_round"] and "phases of the median trial" in html
