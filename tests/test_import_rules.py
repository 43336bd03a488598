"""Who may import whom (DESIGN.md's layout): the device and the guest's workloads are
the system under test and never depend on the lab that measures them, and the probes
never reach into the lab's orchestration. Checked from the source, every import
statement (function-level ones too), so a violation fails here, not in a review."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages it must not import
FORBIDDEN = {
    "device": {"lab", "reports", "probes", "fuzz"},
    "workloads": {"lab", "reports", "probes"},
    "probes": {"lab"},
    "fuzz": {"lab", "reports", "probes"},     # the fuzzer tests the device; lab/ only runs it (CLI)
}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(node.lineno, a.name.split(".")[0]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.lineno, node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_what_it_must_not(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}"
           for f in files for line, mod in sorted(imported_packages(f)) if mod in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_rule_sees_a_violation(tmp_path):
    """The checker itself: a file that imports lab inside a function is caught."""
    f = tmp_path / "x.py"
    f.write_text("import os\n\ndef f():\n    from lab.spec import load_spec\n    return load_spec\n")
    assert (4, "lab") in imported_packages(f)


def test_raw_guest_is_written_from_the_docs_alone():
    """The hostile raw guest (whose RawRing device/rig.py's DeviceRig writes rings with)
    imports none of the project's code: what it puts on a ring does not come from the
    code that reads it."""
    own = {"device", "lab", "fuzz", "reports", "probes", "workloads"}
    bad = sorted((line, mod) for line, mod in imported_packages(ROOT / "device/guest/raw_guest.py") if mod in own)
    assert not bad, bad
