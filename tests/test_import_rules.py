"""Who may import whom, as docs/ARCHITECTURE.md's rooms table says it: the rule is read
from the doc's "may import" column, so the doc and the guard cannot drift apart. Every
import statement of every package counts (function-level ones too): a file's room is the
longest room path of the table that holds it; it may import its own room and the rooms
its row names (a folder names everything under it), and nothing else of the project.
The lab imports of the device only device/api.py, and only the names of its __all__."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("device", "workloads", "probes", "fuzz", "fmt", "system", "reports", "lab", "benchmarks", "scripts")
_ROOM = re.compile(r"`([\w./-]+)`")


def rooms_table(text: str) -> dict[str, tuple[str, ...]]:
    """room -> the rooms it may import, from the doc's rooms table (| room | holds | may import |)."""
    lines = text.split("## Rooms", 1)[1].splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| room |"))
    table: dict[str, tuple[str, ...]] = {}
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        room = _ROOM.fullmatch(cells[0])
        assert room, f"a room cell must be one `path`: {cells[0]!r}"
        table[room.group(1)] = tuple(_ROOM.findall(cells[-1]))
    return table


def room_of(path: str, rooms) -> str | None:
    """The longest room of `rooms` that holds `path` (a file path, or a room itself)."""
    best = None
    for r in rooms:
        if path == r or (r.endswith("/") and path.startswith(r)):
            if best is None or len(r) > len(best):
                best = r
    return best


def module_files(root: Path = ROOT) -> dict[str, str]:
    """dotted module -> its file, relative to root, for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            rel = f.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = rel.as_posix()
    return out


def imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every absolute import in a Python file; name is "" for
    `import x.y` and the imported name for `from x import name`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module, a.name) for a in node.names]
    return out


def target_file(module: str, name: str, files: dict[str, str]) -> str | None:
    """The project file an import reaches: `from a.b import c` is module a.b.c if that is
    a module, else a name of a.b; None for anything outside the project."""
    for dotted in ((f"{module}.{name}", module) if name else (module,)):
        while dotted:
            if dotted in files:
                return files[dotted]
            dotted = dotted.rpartition(".")[0]
    return None


def violations(table: dict[str, tuple[str, ...]], root: Path = ROOT) -> list[str]:
    files = module_files(root)
    bad = []
    for src in sorted(set(files.values())):
        own = room_of(src, table)
        if own is None:
            bad.append(f"{src}: in no room of the table")
            continue
        for line, module, name in imports(root / src):
            dst = target_file(module, name, files)
            if dst is None or dst == src:
                continue
            there = room_of(dst, table)
            if there == own or any(room_of(dst, [allowed]) for allowed in table[own]):
                continue
            bad.append(f"{src}:{line} imports {module}{'.' + name if name else ''} ({there}): "
                       f"room {own} may import {', '.join(table[own]) or 'nothing'}")
    return bad


def test_the_doc_has_a_table_of_every_package():
    table = rooms_table(DOC.read_text())
    assert {r.split("/")[0] for r in table} >= set(PACKAGES)
    for room, allowed in table.items():
        for a in allowed:
            assert (ROOT / a).exists(), f"{room} may import {a}, which does not exist"


def test_every_import_is_one_the_doc_allows():
    bad = violations(rooms_table(DOC.read_text()))
    assert not bad, "imports docs/ARCHITECTURE.md's rooms table does not allow:\n" + "\n".join(bad)


def test_the_rule_sees_a_violation(tmp_path):
    """The checker itself: a function-level import of a room the row does not name, and
    `from device import vmm` (a room named as a name), are both caught."""
    for d, body in {"device/vmm": "", "device/guest": "", "lab": ""}.items():
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "__init__.py").write_text(body)
    (tmp_path / "device" / "__init__.py").write_text("")
    (tmp_path / "device/vmm/process.py").write_text("def f():\n    from lab.spec import load_spec\n")
    (tmp_path / "device/guest/process.py").write_text("from device import vmm\n")
    (tmp_path / "lab/spec.py").write_text("import device.guest.process\n")
    table = {"device/": (), "device/vmm/": (), "device/guest/": (), "lab/": ("device/guest/",)}
    found = violations(table, tmp_path)
    assert [b.split(" (")[0] for b in found] == ["device/guest/process.py:1 imports device.vmm",
                                                 "device/vmm/process.py:2 imports lab.spec.load_spec"], found


def test_the_table_reader_reads_the_last_column():
    text = "## Rooms\n\n| room | holds | may import |\n|--|--|--|\n| `a/` | `x.py` things | `b/`, `c.py` |\n" \
           "| `b/` | b | nothing |\n\nafter\n"
    assert rooms_table(text) == {"a/": ("b/", "c.py"), "b/": ()}


def test_the_lab_uses_only_the_device_api():
    """lab/ imports of the device only device/api.py's __all__: the table's rows say
    device/api.py, and this says which names."""
    import device.api
    api = set(device.api.__all__)
    bad = [f"{f.relative_to(ROOT)}:{line} imports {name} from {module}"
           for f in sorted((ROOT / "lab").rglob("*.py"))
           for line, module, name in imports(f)
           if module == "device.api" and name not in api]
    assert not bad, "not in device/api.py's __all__:\n" + "\n".join(bad)


def test_every_api_name_exists():
    import device.api
    assert sorted(device.api.__all__) == sorted(set(device.api.__all__))
    assert [n for n in device.api.__all__ if not hasattr(device.api, n)] == []


def test_raw_guest_is_written_from_the_docs_alone():
    """The hostile raw guest (whose RawRing device/rig.py's DeviceRig writes rings with)
    imports none of the project's code: what it puts on a ring does not come from the
    code that reads it."""
    own = set(PACKAGES)
    bad = [(line, module) for line, module, _ in imports(ROOT / "device/guest/raw_guest.py")
           if module.split(".")[0] in own]
    assert not bad, bad


@pytest.mark.parametrize("package", ["device", "workloads"])
def test_the_system_under_test_never_imports_the_lab(package):
    """Said twice on purpose: the table could be edited to allow it; this cannot."""
    bad = [f"{f.relative_to(ROOT)}:{line} imports {module}" for f in sorted((ROOT / package).rglob("*.py"))
           for line, module, _ in imports(f) if module.split(".")[0] in ("lab", "reports", "probes", "fuzz")]
    assert not bad, "\n".join(bad)
