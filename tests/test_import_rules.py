"""Who may import whom (docs/ARCHITECTURE.md): the device and the guest's workloads are
the system under test and never depend on the lab that measures them, and the probes
never reach into the lab's orchestration. Inside the device, the two sides of the
virtio boundary only meet in device/virtio/: the guest side never imports the host
side, nor the host side the guest's, and the shared room imports neither. Checked from
the source, every import statement (function-level ones too), so a violation fails
here, not in a review."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages it must not import
FORBIDDEN = {
    "device": {"lab", "reports", "probes", "fuzz"},
    "workloads": {"lab", "reports", "probes"},
    "probes": {"lab", "reports"},
    "fuzz": {"lab", "reports", "probes"},     # the fuzzer tests the device; lab/ only runs it (CLI)
    # the machine's OS facilities (signals, kernel knobs): every room may use them, they use nothing of ours
    "system": {"lab", "reports", "probes", "fuzz", "device", "workloads", "fmt"},
}


# device room -> device rooms it must not import (a room is a dotted prefix)
# device/rig.py, the shared test rig, sets up both sides at once (a device and the raw
# guest's ring writer): it stands outside the rooms, and no room imports it.
DEVICE_FORBIDDEN = {
    "device.guest": {"device.host", "device.rig"},
    "device.host": {"device.guest", "device.rig"},
    "device.virtio": {"device.host", "device.guest", "device.rig"},
}


def imported_modules(path: Path) -> set[tuple[int, str]]:
    """(line, dotted module) of every absolute import in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {(node.lineno, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {(node.lineno, node.module)}
            # `from device import host` names a room too
            out |= {(node.lineno, f"{node.module}.{a.name}") for a in node.names}
    return out


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a Python file."""
    return {(line, mod.split(".")[0]) for line, mod in imported_modules(path)}


def _in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


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


@pytest.mark.parametrize("room", sorted(DEVICE_FORBIDDEN))
def test_device_sides_meet_only_in_virtio(room):
    files = sorted((ROOT / room.replace(".", "/")).rglob("*.py"))
    assert files, f"no Python files in {room}"
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}"
           for f in files for line, mod in sorted(imported_modules(f))
           for other in DEVICE_FORBIDDEN[room] if _in_room(mod, other)]
    assert not bad, "\n".join(bad)


def test_the_side_rule_sees_a_violation(tmp_path):
    """`from device import host` and `import device.host.vmm` both name the host room."""
    f = tmp_path / "y.py"
    f.write_text("from device import host\nimport device.host.vmm as v\nfrom device.virtio.layout import GiB\n")
    mods = {m for _, m in imported_modules(f)}
    assert any(_in_room(m, "device.host") for m in mods if m.startswith("device.host"))
    assert {m for m in mods if _in_room(m, "device.host")} == {"device.host", "device.host.vmm"}
    assert not _in_room("device.hostile", "device.host")


# The device's API for the lab (docs/ARCHITECTURE.md, "What the lab may use of the
# device"): module -> the names lab/, reports/ and benchmarks/ may import from it. The
# lab starts the VMM and the guest as processes (python -m device.host.vmm) and talks
# to them over sockets; what it imports is the tables it offers choices from, the
# metric declarations it reads kinds and units from, the host checks `doctor` runs,
# and the hostile raw guest its attacks play. Anything else is a device internal.
DEVICE_API = {
    "device.virtio.protocols": {"PROTOCOLS", "PROTOCOL_NAMES", "max_batch_of"},
    "device.virtio.discard": {"DISCARD_METHOD_NAMES", "punch_hole"},
    "device.virtio.backing": {"BACKINGS", "BackingError", "ensure_backing", "advise_mapping", "MFD_HUGE_2MB",
                              "MFD_HUGETLB", "NR_HUGEPAGES", "THP_SHMEM_KNOB", "thp_shmem_state", "backing_problem",
                              "hugetlb_pool"},
    "device.virtio.hint_format": {"HINT_DESIGNS"},
    "device.virtio.layout": {"MiB", "GiB", "PAGE_SHIFT", "PAGE_SIZE"},
    "device.host.host_pages": {"PARTIAL_TRACKING", "HOST_PAGE_METRICS"},
    "device.guest.alloc_policy": {"ALLOC_POLICIES"},
    "device.guest.page_reporting_driver": {"ReportingParams"},
    "device.virtio.metric_decl": {"COUNTER", "GAUGE", "TIMING", "LOWER", "HIGHER", "EXACT", "ZERO",
                                  "Metric", "MetricSet", "UndeclaredMetric",
                                  "declared_by"},
    "device.host.balloon_metrics": {"DEVICE_METRICS", "DEVICE_OP_METRICS"},
    "device.guest.balloon_driver": {"DRIVER_OP_METRICS"},
    "device.virtio.queue_metrics": {"DEVICE_QUEUE_METRICS"},
    "device.virtio.transport": {"REFUSAL_METRICS"},
    "device.guest.raw_guest": {"RawError", "RawGuest", "F_INDIRECT", "F_NEXT"},
}
# Rooms that use more of the device on purpose: the fuzzer and the benchmarks drive a
# device in-process (white-box, like the tests), so the rule does not apply to them.
LAB_ROOMS = ("lab", "reports")


def imported_names(path: Path) -> set[tuple[int, str, str]]:
    """(line, module, name) of every `from device... import name` in a Python file;
    name is "*" for a bare `import device...`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[int, str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("device"):
            out |= {(node.lineno, node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {(node.lineno, a.name, "*") for a in node.names if a.name.startswith("device")}
    return out


@pytest.mark.parametrize("room", LAB_ROOMS)
def test_the_lab_uses_only_the_device_api(room):
    bad = [f"{f.relative_to(ROOT)}:{line} imports {name} from {mod}"
           for f in sorted((ROOT / room).rglob("*.py"))
           for line, mod, name in sorted(imported_names(f)) if name not in DEVICE_API.get(mod, ())]
    assert not bad, ("not in the device's API for the lab (docs/ARCHITECTURE.md; tests/test_import_rules.py "
                     "DEVICE_API):\n" + "\n".join(bad))


def test_the_api_rule_sees_a_violation(tmp_path):
    f = tmp_path / "z.py"
    f.write_text("from device.host.balloon_device import BalloonDevice\nfrom device.virtio.protocols import PROTOCOLS\n")
    names = imported_names(f)
    assert (1, "device.host.balloon_device", "BalloonDevice") in names
    assert [n for _, m, n in names if n not in DEVICE_API.get(m, ())] == ["BalloonDevice"]


def test_every_api_name_exists():
    """The list above is documentation: a name that no longer exists is an error."""
    import importlib
    missing = [f"{m}.{n}" for m, names in DEVICE_API.items() for n in names
               if not hasattr(importlib.import_module(m), n)]
    assert not missing, missing


def test_raw_guest_is_written_from_the_docs_alone():
    """The hostile raw guest (whose RawRing device/rig.py's DeviceRig writes rings with)
    imports none of the project's code: what it puts on a ring does not come from the
    code that reads it."""
    own = {"device", "lab", "fuzz", "fmt", "reports", "probes", "workloads", "system"}
    bad = sorted((line, mod) for line, mod in imported_packages(ROOT / "device/guest/raw_guest.py") if mod in own)
    assert not bad, bad
