"""The house in numbers: modules and lines per room, the largest modules, the import
arrows, and the places that list the balloon protocols, for the working tree and (with
--base REV) for an older commit beside it, so a redesign can show what it changed.

    python scripts/layout_stats.py [--base REV] [--top N]

Counts Python source lines (every line, as `wc -l` does) of the project's packages;
tests/ are counted apart. A room is a top-level package, device/<side>/, or lab/<room>/
(a module at lab/'s top level is in room lab/). An arrow is one module importing
another (every import statement, function-level ones too; tests/ left out); "lab/
arrows" are those between two modules of lab/, "arrows up" those between two packages
that import each other (a circle of folders). A "place that lists the protocols" is a
source line (outside tests/) holding at least three of the protocol names as string
literals, e.g. a tuple or a choice list; docs and comments are not counted.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("device", "fuzz", "lab", "probes", "workloads", "fmt", "reports", "benchmarks", "tests")
PROTOCOL_NAMES = ("pfn", "pfn-ranges", "bitmap", "chunks")
_LITERAL = re.compile(r"""["']([a-z-]+)["']""")


def _tree(rev: str | None) -> dict[str, str]:
    """path -> text of every .py file under PACKAGES, at `rev` (None: the working tree)."""
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for pkg in PACKAGES if (ROOT / pkg).is_dir()
                for p in sorted((ROOT / pkg).rglob("*.py")) if ".venv" not in p.parts}
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "--", *PACKAGES],
                           check=True, capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{n}"], check=True,
                              capture_output=True, text=True).stdout for n in names if n.endswith(".py")}


def _room(path: str) -> str:
    """The room a file lives in: its top-level folder, device/<side>/ or lab/<room>/."""
    parts = path.split("/")
    if parts[0] in ("device", "lab") and len(parts) > 2:
        return "/".join(parts[:2]) + "/"
    return parts[0] + "/"


def _module(path: str) -> str:
    parts = path[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _arrows(files: dict[str, str]) -> set[tuple[str, str]]:
    """(importer, imported) file pairs of the project's modules (tests left out)."""
    mods = {_module(p): p for p in files if not p.startswith("tests/")}
    out = set()
    for p, text in files.items():
        if p.startswith("tests/"):
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and mods[n] != p and not _module(p).startswith(n + "."):
                    out.add((p, mods[n]))
                    break
    return out


def _protocol_lists(files: dict[str, str]) -> list[str]:
    out = []
    for path, text in files.items():
        if path.startswith("tests/"):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if len(set(_LITERAL.findall(code)) & set(PROTOCOL_NAMES)) >= 3:
                out.append(f"{path}:{n}")
    return out


def measure(rev: str | None) -> dict:
    files = _tree(rev)
    lines = {p: t.count("\n") + (0 if t.endswith("\n") or not t else 1) for p, t in files.items()}
    rooms = Counter()
    room_modules = Counter()
    for p, n in lines.items():
        rooms[_room(p)] += n
        room_modules[_room(p)] += 1
    source = {p: n for p, n in lines.items() if not p.startswith("tests/")}
    arrows = _arrows(files)
    top = {(a.split("/")[0], b.split("/")[0]) for a, b in arrows if a.split("/")[0] != b.split("/")[0]}
    lab_top = sum(1 for p in source if p.startswith("lab/") and p.count("/") == 1) + \
        len({p.split("/")[1] for p in source if p.startswith("lab/") and p.count("/") > 1})
    return {"rooms": rooms, "room_modules": room_modules, "largest": sorted(source.items(), key=lambda kv: -kv[1]),
            "protocol_lists": _protocol_lists(files), "modules": len(source),
            "over_500": sum(1 for n in source.values() if n > 500),
            "arrows": len(arrows), "lab_arrows": sum(1 for a, b in arrows if a.startswith("lab/") and b.startswith("lab/")),
            "package_arrows": len(top), "circles": sorted({tuple(sorted(e)) for e in top if e[::-1] in top}),
            "lab_top_level": lab_top}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layout_stats", description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="an older commit to measure beside the working tree")
    ap.add_argument("--top", type=int, default=10, help="how many of the largest modules to list")
    a = ap.parse_args(argv)
    now = measure(None)
    before = measure(a.base) if a.base else None
    label = f"{a.base[:10]}" if a.base else ""
    print(f"{'room (modules, lines)':<24}{label:>16}{'now':>16}")
    for room in sorted(set(now["rooms"]) | set(before["rooms"] if before else ())):
        cell = lambda m: f"{m['room_modules'].get(room, 0):>5} {m['rooms'].get(room, 0):>8}  " if m else f"{'':>16}"
        print(f"{room:<24}{cell(before)}{cell(now)}")
    print()
    for key, what in (("lab_top_level", "modules and rooms at lab/'s top level"), ("arrows", "arrows (module imports module)"),
                      ("lab_arrows", "arrows inside lab/"), ("package_arrows", "arrows between top-level packages")):
        print(f"{what:<40}{before[key] if before else '':>10}{now[key]:>10}")
    for name, m in (("before", before), ("now", now)):
        if m is not None:
            print(f"{name}: packages that import each other: {', '.join(' <-> '.join(c) for c in m['circles']) or 'none'}")
    for name, m in (("before", before), ("now", now)):
        if m is None:
            continue
        print(f"\n{name}: {m['modules']} modules outside tests/, {m['over_500']} over 500 lines; largest:")
        for p, n in m["largest"][:a.top]:
            print(f"  {n:>5}  {p}")
        print(f"{name}: {len(m['protocol_lists'])} place(s) list the protocols:")
        for where in m["protocol_lists"]:
            print(f"  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
