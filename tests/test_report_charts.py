"""The report's charts, drawn from a real run with probes (conftest.py lab_store) and
inspected as matplotlib laid them out: no legend covers a data point, no two value labels
overlap, the histograms are whole counts on linear axes (not sparse dots on a log axis),
and every axis writes sizes and counts as the tables do (4 KiB, 1 024; never 4K or 1Ki).
The pixels are checked in Chromium by tests/test_report_browser.py."""
from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from lab.store.store import Store
from lab.cli.report_data import load
from reports import charts
from reports.html import build

HISTOGRAMS = ("plot-run-length", "plot-madvise-len", "plot-madvise-ns", "plot-page-alloc-order")


@pytest.fixture(scope="module")
def figures(lab_store) -> dict[str, Figure]:
    """Every figure the report draws, laid out (the real render still writes each one)."""
    drawn: dict[str, Figure] = {}
    real = charts.render

    def keep(fig: Figure, chart_id: str, alt: str, **kw) -> charts.Chart:
        drawn[chart_id] = fig
        return real(fig, chart_id, alt, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(charts, "render", keep)
        with Store(lab_store.db, create=False) as store:
            build(load(store, lab_store.run_id))
    for fig in drawn.values():
        FigureCanvasAgg(fig).draw()
    assert set(HISTOGRAMS) | {"plot-kicks-per-mib"} <= set(drawn), sorted(drawn)
    return drawn


def _data_points(ax) -> np.ndarray:
    """Display coordinates of every plotted point and bar top of an axes."""
    xy = [np.asarray(line.get_xydata(), dtype=float) for line in ax.lines]
    pts = [ax.transData.transform(p[np.isfinite(p).all(axis=1)]) for p in xy if len(p)]
    pts += [c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections
            if isinstance(c, PathCollection) and len(c.get_offsets())]
    pts += [ax.transData.transform([(p.get_x() + p.get_width() / 2, p.get_y() + p.get_height())])
            for p in ax.patches if p.get_height() > 0]
    return np.concatenate(pts) if pts else np.zeros((0, 2))


def test_no_legend_covers_data(figures):
    for cid, fig in figures.items():
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent()
            inside = [p for p in _data_points(ax) if box.contains(*p)]
            assert not inside, (cid, "legend covers", len(inside), "points")


def test_value_labels_cover_neither_each_other_nor_a_data_point(figures):
    for cid, fig in figures.items():
        for ax in fig.axes:
            texts = [t for t in ax.texts if t.get_text().strip()]
            boxes = [t.get_window_extent() for t in texts]
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), (cid, [t.get_text() for t in ax.texts])
            points = _data_points(ax)
            for t, box in zip(texts, boxes):
                covered = [p for p in points if box.contains(*p)]
                assert not covered, (cid, f"label {t.get_text()!r} covers {len(covered)} data point(s)")


def test_histograms_are_whole_counts_on_linear_axes(figures):
    for cid in HISTOGRAMS:
        fig = figures[cid]
        axes = [ax for ax in fig.axes if ax.patches]
        assert axes and all(ax.get_yscale() == "linear" for ax in fig.axes), cid
        labels = [t.get_text() for ax in axes for t in ax.texts]
        assert labels and all(re.fullmatch(r"\d{1,3}( \d{3})*", s) for s in labels), (cid, labels)


def test_axes_write_sizes_and_counts_as_the_tables_do(figures):
    ticks = {cid: [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
             for cid, fig in figures.items()}
    short = {cid: [t for t in ts if re.fullmatch(r"[\d.]+\s?(K|M|G|Ki|Mi|Gi)", t)] for cid, ts in ticks.items()}
    assert not any(short.values()), short
    assert "4 KiB" in ticks["plot-madvise-len"] and any(re.fullmatch(r"\d \d{3}", t) for t in ticks["plot-run-length"])
