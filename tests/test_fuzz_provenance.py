"""A fuzz run says which code it executed (fuzz/provenance.py), and a replay says which
saved cases were found by other code: a failure that does not replay is then explained
by the code, not by chance (the seed-1011 hang of docs/BAD_INPUT.md)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from conftest import BALLOON_LAB
from fuzz import provenance

ROOT = Path(__file__).resolve().parents[1]
FOUND = ROOT / "tests" / "fuzz_corpus" / "found" / "control-old-kick-eventfd-number-reused.jsonl"


def test_the_digest_follows_the_fuzzed_sources_and_nothing_else(tmp_path):
    for pkg in (*provenance.PACKAGES, "lab"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text("x = 1\n")
    first = provenance.source_digest(tmp_path)
    (tmp_path / "lab" / "m.py").write_text("x = 2\n")            # the lab's own code: no fuzz execution runs it
    assert provenance.source_digest(tmp_path) == first
    (tmp_path / "device" / "m.py").write_text("x = 2\n")
    assert provenance.source_digest(tmp_path) != first
    shutil.copy(tmp_path / "fuzz" / "m.py", tmp_path / "fuzz" / "n.py")
    assert len({first, provenance.source_digest(tmp_path)}) == 2


def _replay(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BALLOON_LAB, "fuzz", "--replay", str(path), "--json"], capture_output=True, text=True,
                          timeout=120)


def test_a_replay_names_cases_found_by_other_code(tmp_path):
    case = json.loads(FOUND.read_text().splitlines()[0])
    here = provenance.source_digest()
    (tmp_path / "other.jsonl").write_text(json.dumps(dict(case, source_digest="0123456789abcdef")) + "\n")
    (tmp_path / "same.jsonl").write_text(json.dumps(dict(case, source_digest=here)) + "\n")
    other, same, kept = _replay(tmp_path / "other.jsonl"), _replay(tmp_path / "same.jsonl"), _replay(FOUND)
    assert other.returncode == same.returncode == kept.returncode == 0, (other.stderr, same.stderr, kept.stderr)
    assert (f"1 of 1 case(s) were found by other code (source digest 0123456789abcdef; here {here})"
            in other.stderr), other.stderr
    assert "other code" not in same.stderr and "other code" not in kept.stderr


def test_a_run_reports_the_code_it_ran():
    out = subprocess.run([BALLOON_LAB, "fuzz", "--execs", "40", "--seed", "3", "--workers", "1", "--json", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["source_digest"] == provenance.source_digest()
    assert "source_digest_at_end" not in report and "changed while" not in out.stderr
