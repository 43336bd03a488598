"""Check docs/ARCHITECTURE.md's "One inflate, hop by hop": every file it names exists and
every definition it names is defined where it says, so the walk cannot go stale.

    python scripts/check_hops.py [--doc docs/ARCHITECTURE.md] [--section "One inflate, hop by hop"]

A hop names code as `path/to/file.py:name` (a function, a class, a constant, or
`Class.method`), as a bare `path/to/file.py`, or as a bare `Class.member`, which must be
defined in the one project file that defines Class, or a bare `_name`, a method of a
class of the file the hop list named last. Prints one line per reference (ok or
MISSING) and exits 1 if anything is missing.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TICKED = re.compile(r"`([^`]+)`")
_WITH_FILE = re.compile(r"^([\w./-]+\.py)(?::([\w.]+))?$")
_BARE = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*)(?:\(.*\))?$")


@lru_cache(maxsize=None)
def definitions(path: Path) -> frozenset[str]:
    """Every name a file defines at its top level, and Class.member for its classes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        out.add(f"{node.name}.{item.name}")
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        out.add(f"{node.name}.{item.target.id}")
                    elif isinstance(item, ast.Assign):
                        out |= {f"{node.name}.{t.id}" for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Assign):
            out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return frozenset(out)


def section(text: str, title: str) -> str:
    part = text.split(f"## {title}", 1)
    if len(part) < 2:
        raise SystemExit(f"check_hops: no section '## {title}'")
    return part[1].split("\n## ", 1)[0]


PACKAGES = ("device", "workloads", "probes", "fuzz", "fmt", "reports", "lab")


@lru_cache(maxsize=None)
def class_files(root: Path = ROOT) -> dict[str, list[Path]]:
    """Class name -> the project files that define it."""
    out: dict[str, list[Path]] = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            for d in definitions(f):
                if "." not in d and d[:1].isupper():
                    out.setdefault(d, []).append(f)
    return out


def check(text: str, root: Path = ROOT) -> list[tuple[str, str, bool]]:
    """(reference, where it was looked up, found) for every code reference in the text."""
    results = []
    last_file: Path | None = None
    for ref in _TICKED.findall(text):
        m = _WITH_FILE.match(ref)
        if m:
            path = root / m.group(1)
            if not path.is_file():
                results.append((ref, m.group(1), False))
                continue
            last_file = path
            results.append((ref, m.group(1), not m.group(2) or m.group(2) in definitions(path)))
            continue
        m = _BARE.match(ref)
        if not m:
            continue
        name = m.group(1)
        head = name.split(".")[0]
        if "." in name and head[:1].isupper():
            files = class_files(root).get(head, [])
            if len(files) != 1:
                results.append((ref, f"{len(files)} files defining {head}", False))
            else:
                results.append((ref, str(files[0].relative_to(root)), name in definitions(files[0])))
        elif name.startswith("_") and "." not in name and last_file is not None:
            results.append((ref, str(last_file.relative_to(root)),
                            any(d.endswith("." + name) for d in definitions(last_file)) or name in definitions(last_file)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="check_hops", description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "ARCHITECTURE.md")
    ap.add_argument("--section", default="One inflate, hop by hop")
    a = ap.parse_args(argv)
    results = check(section(a.doc.read_text(), a.section))
    for ref, where, ok in results:
        print(f"{'ok     ' if ok else 'MISSING'}  {ref}" + ("" if ref.startswith(where) else f"  (in {where})"))
    missing = sum(1 for *_, ok in results if not ok)
    print(f"{len(results)} references, {missing} missing")
    return 1 if missing or not results else 0


if __name__ == "__main__":
    sys.exit(main())
