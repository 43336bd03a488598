"""Declared metrics: every counter, timing and gauge declared once (kind, unit, doc), the
lab reading them instead of guessing from names, the versioned trial result, and the
stage() context manager's markers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device.guest.balloon_driver import DRIVER_OP_METRICS, DriverOpReport
from device.vmm.balloon_metrics import DEVICE_OP_METRICS, DeviceOpCounters
from device.vmm.huge_pages import HOST_PAGE_METRICS, HostPageTracker
from device.virtio.layout import GuestLayout
from device.virtio.metric_decl import (COUNTER, TIMING, Metric, MetricSet, UndeclaredMetric, declared_by,
                                       numeric_fields)
from device.virtio.queue_metrics import DEVICE_QUEUE_METRICS, DRIVER_QUEUE_METRICS
from device.virtio.ram import GuestRAM
from device.virtio.device_queue import DeviceQueue
from device.virtio.driver_queue import DriverQueue
from device.virtio.split_ring import ring_layout
from lab.results import metric_catalog
from lab.results import metrics
from lab.results.trial_result import SCHEMA_VERSION, VERSION_KEY, TrialResult
from probes.session import PROBE_METRICS, ProbeReading

DATA = Path(__file__).parent / "data"
PY = sys.executable


# --- the declarations against the name-guessing they replaced ------------------------------------
def test_declared_kinds_and_units_are_the_ones_the_name_guessing_gave():
    """tests/data/metric_kinds_before.json holds lab/results/metrics.py's answers before metrics
    were declared, for every metric name a real run of the default experiment stored,
    every name of a live migration trial, and one instance of every declaration."""
    before = json.loads((DATA / "metric_kinds_before.json").read_text())["metrics"]
    assert sum(1 for _, _, src in before.values() if src == "default-run") == 214
    differ = {n: (kind, unit, metrics.classify(n), metrics.unit(n)) for n, (kind, unit, _src) in before.items()
              if (metrics.classify(n), metrics.unit(n)) != (kind, unit)}
    # the two rates the name-guessing took for timings in seconds are throughputs now
    # (issue 22: a throughput loss read as an improvement)
    assert differ == {"wire_gbit_s": ("timing", "s", "gauge", "Gbit/s"),
                      "workload.stop.achieved_mib_s": ("timing", "s", "gauge", "MiB/s")}


def test_every_metric_of_a_stored_trial_is_declared():
    stored = json.loads((DATA / "trial_result_v1.json").read_text())["result"]
    values, hists = metrics.flatten(stored)
    assert len(values) > 150 and "run_length_hist" in hists
    metrics.check_declared(stored)


def test_every_metric_of_a_real_qemu_migration_is_declared_as_before():
    """QEMU's own migration results (lab/trials/qemu/migrate.py) hold query-migrate's
    fields: each is declared, with the kind and unit the name-guessing gave them."""
    doc = json.loads((DATA / "qemu_migration_results.json").read_text())
    assert {r["hint"] for r in doc["results"]} == {"none", "upstream"}
    for result in doc["results"]:
        metrics.check_declared(result)
    differ = {n: (kind, unit, metrics.classify(n), metrics.unit(n)) for n, (kind, unit) in doc["kinds_before"].items()
              if (metrics.classify(n), metrics.unit(n)) != (kind, unit)}
    assert differ == {} and "pages_skipped" in doc["kinds_before"]


def test_an_undeclared_metric_is_a_clear_error():
    with pytest.raises(UndeclaredMetric) as e:
        metrics.classify("inflate.no_such_counter")
    assert "'inflate.no_such_counter' is not declared" in str(e.value) and "metric_decl.Metric" in str(e.value)
    with pytest.raises(UndeclaredMetric):
        metrics.unit("probes.no_such_probe_count")


def test_declare_adds_a_trial_functions_own_metric_once():
    metric_catalog.declare(Metric("test_decl.loop_ns", TIMING, "ns", "a test's own timing"))
    assert metrics.classify("test_decl.loop_ns") == TIMING and metrics.unit("test_decl.loop_ns") == "ns"
    metric_catalog.declare(Metric("test_decl.loop_ns", TIMING, "ns", "the same again"))     # same: fine
    with pytest.raises(ValueError, match="declared twice"):
        metric_catalog.declare(Metric("test_decl.loop_ns", COUNTER, "", "a different kind"))


def test_a_metric_needs_a_known_kind_unit_and_one_doc_line():
    with pytest.raises(ValueError, match="kind"):
        Metric("x", "histogramme", "", "doc")
    with pytest.raises(ValueError, match="unit"):
        Metric("x", COUNTER, "pages", "doc")
    with pytest.raises(ValueError, match="one-line doc"):
        Metric("x", COUNTER, "", "two\nlines")
    with pytest.raises(ValueError, match="declared twice"):
        MetricSet("here", [Metric("x", COUNTER, "", "a"), Metric("x", COUNTER, "", "b")])


# --- each side declares what it counts ---------------------------------------------------------
def test_counter_dataclasses_declare_every_counter():
    assert DeviceOpCounters.METRICS is DEVICE_OP_METRICS and DriverOpReport.METRICS is DRIVER_OP_METRICS
    assert ProbeReading.METRICS is PROBE_METRICS

    with pytest.raises(TypeError, match=r"counters \['sneaky'\] are not declared"):
        @declared_by(MetricSet("test", [Metric("pages", COUNTER, "", "pages")]))
        @dataclass
        class Counters:
            pages: int = 0
            sneaky: int = 0


def test_what_crosses_processes_as_dicts_is_declared():
    DEVICE_OP_METRICS.check(DeviceOpCounters(requests=1, pages=3).snapshot())
    DRIVER_OP_METRICS.check({k: v for k, v in DriverOpReport("inflate", 10).to_json().items()})
    PROBE_METRICS.check(ProbeReading("bcc", madvise_calls=3, per_queue={"0": {"kick_write": 1, "call_read_empty": 2}},
                                     stages={"encode": {"count": 1, "ns": 5, "madvise_calls": 0,
                                                        "madvise_kernel_ns": 0, "fallocate_calls": 0,
                                                        "fallocate_kernel_ns": 0}}).to_json())
    HOST_PAGE_METRICS.check(HostPageTracker(4096, 21).snapshot())
    layout = GuestLayout.pc(64)
    ram = GuestRAM.create(layout)
    try:
        rl = ring_layout(1 << 20, 16)
        drv = DriverQueue(ram, 0, 16, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=True, indirect=False,
                          kick=lambda: None)
        dev = DeviceQueue(ram, 0, 16, rl.desc_gpa, rl.avail_gpa, rl.used_gpa, event_idx=True, indirect=False)
        drv.add_buf([(2 << 20, 4096)], [], "x")
        drv.kick_if_needed()
        chain = dev.pop_avail()
        dev.push_used(chain.head, 0)
        DRIVER_QUEUE_METRICS.check(drv.counters())
        DEVICE_QUEUE_METRICS.check(dev.counters())
        assert set(drv.counters()) == set(DRIVER_QUEUE_METRICS.names())
    finally:
        ram.close()
    with pytest.raises(UndeclaredMetric, match="DEVICE_OP_METRICS"):
        DEVICE_OP_METRICS.check({"pages": 1, "surprise": 2})


def test_declarations_name_exactly_the_counters_each_side_has():
    """No declaration of a counter that no longer exists: each set is its record's fields
    (plus what its snapshot derives)."""
    assert DEVICE_OP_METRICS.names() == numeric_fields(DeviceOpCounters) + ["runs"]
    assert set(DRIVER_OP_METRICS.names()) == set(numeric_fields(DriverOpReport))
    scalars = [m.name for m in PROBE_METRICS if "." not in m.name]
    assert scalars == numeric_fields(ProbeReading)
    assert all(m.doc and m.kind in metrics.KINDS for m in metric_catalog.declared())


# --- the versioned trial result ---------------------------------------------------------------
def test_a_result_stored_before_the_type_loads_and_stores_the_same():
    old = json.loads((DATA / "trial_result_v1.json").read_text())["result"]
    assert VERSION_KEY not in old                        # version 1: before the key existed
    r = TrialResult.from_json(old)
    assert r.protocol == "bitmap" and r.inflate.discard_calls == old["discard_calls"]
    assert r.deflate.pages == old["deflate"]["pages"] and r.twin == old["twin"] and r.host_load == old["host_load"]
    again = r.to_json()
    assert again[VERSION_KEY] == SCHEMA_VERSION == 2
    assert {k: v for k, v in again.items() if k != VERSION_KEY} == old
    assert metrics.flatten(again) == metrics.flatten(old)        # the same metrics, the version is not one
    assert TrialResult.from_json(again) == r


def test_a_newer_result_is_refused_and_unknown_keys_are_kept():
    old = json.loads((DATA / "trial_result_v1.json").read_text())["result"]
    with pytest.raises(ValueError, match="versions 1 to 2"):
        TrialResult.from_json({**old, VERSION_KEY: SCHEMA_VERSION + 1})
    r = TrialResult.from_json({**old, "from_the_future": {"x": 1}})
    assert r.extra == {"from_the_future": {"x": 1}} and r.to_json()["from_the_future"] == {"x": 1}


# --- stage(): the markers stay exactly those of the hand-written pairs ------------------------------
def test_stage_fires_the_markers_and_adds_the_time_also_on_error():
    code = textwrap.dedent("""
    import sys, time
    from device.guest.balloon_driver import DriverOpReport
    from device.virtio.stage import stage
    seen = []
    sys.addaudithook(lambda ev, args: seen.append(ev) if ev.startswith("balloon-lab:") else None)
    rep = DriverOpReport("inflate", 1)
    with stage("inflate", rep, "total_ns"):
        with stage("encode", rep):
            time.sleep(0.002)
        try:
            with stage("transmit", rep, "wait_ns"):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
    print(",".join(seen), rep.encode_ns, rep.total_ns, rep.wait_ns)
    """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0] == ("balloon-lab:inflate:b,balloon-lab:encode:b,balloon-lab:encode:e,balloon-lab:transmit:b,"
                      "balloon-lab:transmit:e,balloon-lab:inflate:e")
    encode_ns, total_ns, wait_ns = map(int, out[1:])
    assert 2_000_000 <= encode_ns < total_ns and 0 < wait_ns < total_ns


def test_stage_names_are_checked():
    from device.virtio.stage import stage

    with pytest.raises(ValueError, match="stage name"):
        stage("Not A Stage")
    with pytest.raises(ValueError, match="stage name"):
        stage("this-name-is-too-long")


def test_no_hand_written_stage_pairs_are_left_in_device():
    root = Path(__file__).parent.parent / "device"
    hand_written = [f"{p.relative_to(root.parent)}:{i}" for p in root.rglob("*.py") if p.name != "stage.py"
                    for i, line in enumerate(p.read_text().splitlines(), 1) if "balloon-lab:" in line
                    and "audit" in line]
    assert hand_written == []
