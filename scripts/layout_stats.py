"""The house in numbers: lines per room, the largest modules, and the places that list
the balloon protocols, for the working tree and (with --base REV) for an older commit
beside it, so a redesign can show what it changed.

    python scripts/layout_stats.py [--base REV] [--top N]

Counts Python source lines (every line, as `wc -l` does) of the project's packages;
tests/ are counted apart. A "place that lists the protocols" is a source line (outside
tests/) holding at least three of the protocol names as string literals, e.g. a tuple
or a choice list; docs and comments are not counted.
"""
from __future__ import annotations

import argparse
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
    """The room a file lives in: its top-level folder, or device/<side>/ for the device."""
    parts = path.split("/")
    if parts[0] == "device" and len(parts) > 2:
        return "/".join(parts[:2]) + "/"
    return parts[0] + "/"


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
    for p, n in lines.items():
        rooms[_room(p)] += n
    source = {p: n for p, n in lines.items() if not p.startswith("tests/")}
    return {"rooms": rooms, "largest": sorted(source.items(), key=lambda kv: -kv[1]),
            "protocol_lists": _protocol_lists(files), "modules": len(source),
            "over_500": sum(1 for n in source.values() if n > 500)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layout_stats", description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="an older commit to measure beside the working tree")
    ap.add_argument("--top", type=int, default=10, help="how many of the largest modules to list")
    a = ap.parse_args(argv)
    now = measure(None)
    before = measure(a.base) if a.base else None
    label = f"{a.base[:10]}" if a.base else ""
    print(f"{'room':<22}{label:>10}{'now':>10}")
    for room in sorted(set(now["rooms"]) | set(before["rooms"] if before else ())):
        b = f"{before['rooms'].get(room, 0):>10}" if before else f"{'':>10}"
        print(f"{room:<22}{b}{now['rooms'].get(room, 0):>10}")
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
