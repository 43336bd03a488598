"""How the lab's text and report read, on a real small run (tests/conftest.py lab_store:
pfn, bitmap and chunks, 2 trials each, 128 MiB inflated): every line of compare and show fits
120 columns; show prints what differs unless --all; a tiny ratio reads "5 461x fewer";
thousands are grouped one way; "too few trials" says how many are needed, and the report
never calls an arm faster where its verdict has none."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from lab.cli import main
from lab.store.store import Store

LINE_WIDTH = 120          # the limit, stated here rather than read from the code under test

PAGES = "32 768"          # 128 MiB in 4 KiB pages: the pfn arm's discard calls


def cli(*args: str) -> str:
    out = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert out.exit_code == 0, out.stderr
    return out.stdout


def too_wide(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if len(ln) > LINE_WIDTH]


@pytest.fixture(scope="module")
def shown(lab_store) -> dict[str, str]:
    db = str(lab_store.db)
    return {"default": cli("show", lab_store.run_id, "--db", db), "all": cli("show", lab_store.run_id, "--db", db, "--all"),
            "history": cli("history", "stages_ns.inflate.total", "--db", db), "runs": cli("runs", "--db", db)}


def test_every_line_fits_120_columns(lab_store, shown):
    assert not too_wide(lab_store.stdout), too_wide(lab_store.stdout)
    for name, text in shown.items():
        assert not too_wide(text), (name, too_wide(text))


def test_show_prints_what_differs_and_all_prints_everything(shown):
    default, every = shown["default"].splitlines(), shown["all"].splitlines()
    assert "discard_calls" in default and "kicks" in default          # the arms differ there
    # pages: equal in both arms, an exact counter; the seed: a parameter, equal
    for same in ("pages", "workload.seed"):
        assert same not in default and any(ln.split()[:1] == [same] for ln in every), same
    assert len(default) < len(every) / 2, (len(default), len(every))
    unfolded = shown["default"].replace("\n    ", " ")
    assert re.search(r"\d+ of \d+ metrics on which no arm differs are not shown \(--all\)", unfolded)


def test_tiny_ratios_are_inverted_and_thousands_grouped_one_way(lab_store, shown):
    for text in (lab_store.stdout, shown["default"]):
        assert "5 461x fewer" in text and "0.000 " not in text and " 0.000\n" not in text
        assert PAGES in text and not re.search(r"(?<![\w.-])(32768|131072)(?![\w.])", text), \
            [ln for ln in text.splitlines() if "32768" in ln or "131072" in ln]


def test_too_few_trials_says_how_many_are_needed(lab_store, shown):
    need = re.findall(r"too few trials \(need (\d+)\)", lab_store.stdout)           # compare's final table
    assert need and len(set(need)) == 1 and int(need[0]) > 2
    assert f"too few trials (need {need[0]})" in shown["default"]
    assert f"needs at least {need[0]} trials per arm" in shown["default"].replace("\n    ", " ")


def test_the_report_never_calls_an_arm_faster_where_its_verdict_has_none(lab_store, tmp_path):
    from lab.cli.report_data import load
    from reports.html import write_report
    with Store(lab_store.db, create=False) as store:
        write_report(load(store, lab_store.run_id), tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    verdict = re.sub(r"<[^>]+>", "", html[html.index('<section id="verdict">'):html.index('<section id="comparison">')])
    assert "no verdict, too few trials" in verdict and "needs at least" in verdict, verdict[:600]
    for sid in ("verdict", "comparison", "stages"):
        start = html.index(f'<section id="{sid}">')
        section = html[start:html.index("</section>", start)]
        bold = re.findall(r"<b>([^<]*)</b>", section)
        assert not [b for b in bold if re.search(r"faster|slower", b)], (sid, bold)
    stages = html[html.index('<section id="stages">'):]
    assert "no verdict: too few trials to tell" in stages and "needs at least" in stages


def test_fold_keeps_commands_pasteable():
    import shlex

    from fmt.text_width import fold, fold_command
    cmd = "balloon-lab compare " + " ".join(f"--opt-{i} 'value {i}'" for i in range(30))
    folded = fold_command(cmd, first=10)
    assert all(len(ln) <= LINE_WIDTH for ln in folded.splitlines())
    assert len(folded.splitlines()[0]) <= LINE_WIDTH - 10
    assert shlex.split(folded.replace(" \\\n", " ")) == shlex.split(cmd)
    assert fold("  " + "word " * 60).splitlines()[1].startswith("      word")
