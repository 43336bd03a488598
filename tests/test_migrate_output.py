"""What `balloon-lab migrate` prints, from real migrations between two real VMMs: the
published figures are judged only for a run of comparable size (else shown for reference,
with their source); binary units only; one CPU time unit per table; its arms are --arms;
its guest defaults to compare's size."""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import BALLOON_LAB
from lab.store.store import Store

CPU_ROWS = ("CPU, source VMM", "CPU, destination VMM", "CPU, guest")


def migrate(tmp_path, *args: str) -> str:
    db = tmp_path / "lab.db"
    out = subprocess.run([BALLOON_LAB, "migrate", "--no-probes", "--quiet", "--db", str(db), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


TIME_UNIT = re.compile(r"\b\d[\d.]* (s|ms|µs|ns)\b")


@pytest.mark.slow
def test_a_small_guest_shows_the_published_figures_for_reference_only(tmp_path):
    text = migrate(tmp_path, "--guest-mib", "256", "--arms", "none,upstream,bitmap")
    assert "reproduced" not in text and "PASS" not in text and "FAIL" not in text
    published = text[text.index("published migration times"):]
    assert published.count("(for reference)") == 4                  # every published figure, none judged
    assert "source: FREE_PAGE_HINT v37 cover letter (2018)" in published and "not judged" in published
    # one unit system: binary bytes only
    assert not re.search(r"\d ?MB\b|\bMB ", text), [ln for ln in text.splitlines() if "MB" in ln]
    # one CPU unit in the medians table, and the same in the comparison table below it
    summary = {u for ln in text.splitlines() if ln.startswith(CPU_ROWS) for u in TIME_UNIT.findall(ln[36:])}
    compared, metric = set(), None
    for ln in text[text.index("\nmetric "):].splitlines()[3:]:
        metric = ln.split()[0] if ln and not ln.startswith(" ") else metric
        if metric and metric.startswith("cpu_s_"):
            compared.add(TIME_UNIT.findall(ln)[0])
    assert len(summary) == 1 and compared == summary, (summary, compared)


@pytest.mark.slow
def test_a_guest_of_comparable_size_is_judged(tmp_path):
    text = migrate(tmp_path, "--guest-mib", "4096", "--arms", "none,bitmap", "--param", "used_share=0.01",
                   "--param", "stale_share=0")
    line = next(ln for ln in text.splitlines() if "bitmap:" in ln and "published 0.250 x" in ln)
    assert line.rstrip().endswith(("reproduced", "NOT reproduced (slower than published)"))
    assert "seed bitmap hints, idle 8 GiB guest, 10 Gbit/s (judged: this run is comparable)" in text
    assert "idle 128 GiB guest (400 ms downtime limit) (for reference)" in text


def test_arms_is_the_option_its_old_name_still_works_and_the_guest_is_compares(tmp_path):
    from click.testing import CliRunner
    from lab.cli import main
    flat = " ".join(CliRunner().invoke(main, ["migrate", "--help"]).stdout.split())
    assert "--arms, --hint DESIGNS" in flat
    guest = {c: re.search(r"--guest-mib INTEGER .*?\[default: (\d+)\]",
                          " ".join(CliRunner().invoke(main, [c, "--help"]).stdout.split())).group(1)
             for c in ("migrate", "compare")}
    assert guest["migrate"] == guest["compare"] == "1024", guest
    migrate(tmp_path, "--guest-mib", "128", "--hint", "none,bitmap")   # a stored run's old command line
    with Store(tmp_path / "lab.db", create=False) as s:
        run = s.get_run("latest")
    assert run.arms == ["none", "bitmap"] and "--arms none,bitmap" in run.command_line
