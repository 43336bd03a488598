"""The real stack as an arm: QEMU + the Debian cloud kernel's virtio_balloon, booted for real.

Nothing is skipped: setup.sh installs QEMU, the cloud kernel, busybox-static and cpio,
and the guest is small (256 MiB, TCG) so the whole file stays within about a minute.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lab.trials.qemu.trace import TraceReader
from lab.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "balloon-lab")
PAGE = 4096


def cli(*args: str, db: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if db is not None:
        env["BALLOON_LAB_DB"] = str(db)
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.ebpf
def test_qemu_pfn_beside_the_lab_pfn_arm_in_one_compare(tmp_path):
    """Same experiment, both backends: the probes on the QEMU pid count one 4 KiB madvise
    per page exactly as on the lab's VMM; QEMU's trace counts one request per 256 pages."""
    db, report = tmp_path / "lab.db", tmp_path / "report.html"
    p = cli("compare", "--arms", "pfn,qemu-pfn", "--guest-mib", "256", "--inflate-mib", "37", "--trials", "1",
            "--warmups", "0", "--workload", "idle", "--quiet", "--report", str(report),
            "--extra-probes", "syscall-time", db=db)
    assert p.returncode == 0, p.stderr[-3000:]
    pages = 37 * 256
    with Store(db, create=False) as store:
        run = store.get_run("latest")
        trials = {t.arm: t for t in store.trials(run.id)}
    env = run.environment
    assert env["qemu_accel"] in ("tcg", "kvm") and env["qemu_version"] and env["guest_kernel"].endswith("-amd64")
    q, lab = trials["qemu-pfn"].result, trials["pfn"].result
    assert trials["qemu-pfn"].status == "ok" and q["verified"] is True, trials["qemu-pfn"].error
    assert all(q["verification"]["after_inflate"]["checks"].values())
    assert all(q["verification"]["after_deflate"]["checks"].values())
    assert q["backend"] == "qemu" and q["environment"]["qemu_accel"] == env["qemu_accel"]
    # QEMU's trace: every page handled, 256 PFNs per request, one queue
    assert q["pages"] == pages and q["requests"] == 37 and q["trace_unmapped_events"] == 0
    assert q["deflate"]["pages"] == pages and q["deflate"]["requests"] == 37
    # the probes on the QEMU pid: one MADV_DONTNEED of 4096 bytes per page, and nothing else
    pr = q["probes"]
    assert pr["backend"] == "bcc", pr.get("reason")
    assert pr["madvise_calls"] == pages and pr["madvise_bytes"] == pages * PAGE
    assert pr["advice"] == {"MADV_DONTNEED": pages} and q["discard_calls"] == pages
    assert pr["deflate"]["advice"] == {"MADV_WILLNEED": pages}          # QEMU's deflate hint, per page
    assert 0 < q["stages_ns"]["inflate"]["discard"] == pr["madvise_kernel_ns"] < q["stages_ns"]["inflate"]["total"]
    # the lab's pfn arm: the same calls, bytes and requests
    assert lab["probes"]["madvise_calls"] == pages and lab["probes"]["madvise_bytes"] == pages * PAGE
    assert lab["requests"] == q["requests"] and lab["pages"] == q["pages"]
    # the text output and the report name the real stack with its accelerator
    assert f"qemu-pfn (QEMU {env['qemu_version']}, {env['qemu_accel']})" in p.stdout
    html = report.read_text()
    assert '<section id="real-stack">' in html and f"under <b>{env['qemu_accel']}</b>" in html
    assert "not measured" in html                                        # guest-side stages are not faked


@pytest.mark.slow
@pytest.mark.ebpf
def test_qemu_pfn_punch_discards_with_fallocate_and_frees_the_memfd():
    """A shared memfd makes QEMU punch a hole per page (then MADV_DONTNEED its mapping);
    the memfd's allocated blocks show what the host got back."""
    p = cli("run", "--protocol", "qemu-pfn-punch", "--guest-mib", "256", "--inflate-mib", "32", "--workload", "aged",
            "--no-deflate", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    pages = 32 * 256
    assert r["verified"] is True and r["memory_backend"] == "memfd" and r["deflate"] is None
    pr = r["probes"]
    assert pr["fallocate_calls"] == pages and pr["fallocate_bytes"] == pages * PAGE
    assert pr["fallocate_modes"] == {"PUNCH_HOLE|KEEP_SIZE": pages}
    assert pr["madvise_calls"] == pages and r["discard_calls"] == 2 * pages
    # aged: the guest touched its free memory first, so nearly every ballooned page was backed
    assert r["memfd_freed_bytes"] > 0.9 * pages * PAGE


def test_qemu_arm_refuses_a_workload_without_a_real_guest_counterpart(tmp_path):
    p = cli("compare", "--arms", "pfn,qemu-pfn", "--workload", "churn", "--trials", "1", db=tmp_path / "x.db")
    assert p.returncode == 2
    assert "no real-guest counterpart" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.db").exists() or not Store(tmp_path / "x.db").list_runs()


def test_trace_reader_counts_per_queue_from_qemu_log_lines(tmp_path):
    """The log backend's line format of QEMU 7.2 (with -msg timestamp=on)."""
    log = tmp_path / "trace.log"
    log.write_text(
        "100@1700000000.000001:virtio_queue_notify vdev 0x1 n 0 vq 0xa0\n"
        "100@1700000000.000002:virtqueue_pop vq 0xa0 elem 0x5 in_num 0 out_num 1\n"
        "100@1700000000.000003:virtio_balloon_handle_output section name: pc.ram gpa: 0x1000\n"
        "100@1700000000.000009:virtio_balloon_handle_output section name: pc.ram gpa: 0x2000\n"
        "100@1700000000.000010:virtio_notify vdev 0x1 vq 0xa0\n"
        "100@1700000000.000011:virtio_notify vdev 0x1 vq 0xbb\n"
        "100@1700000000.000012:virtio_balloon_to_target balloon target: 0x1000 num_pages: 7\n"
        "100@1700000000.000013:virtqueue_pop vq 0xa0 elem 0x6 in_num 0 out_num 1")   # no newline yet
    r = TraceReader(str(log))
    w = r.read_window()
    q0 = w.queue(0)
    assert (q0.kicks, q0.requests, q0.interrupts) == (1, 1, 1)
    assert w.pages == 2 and w.device_span_ns == 6000 and w.targets == [7] and w.unknown_vq == 1
    with open(log, "a") as f:
        f.write("\n")
    assert r.read_window().queue(0).requests == 1                        # the partial line, once complete


@pytest.mark.slow
def test_migrate_backend_qemu_moves_the_real_guest_and_verifies_it(tmp_path):
    """Source and destination QEMU on loopback at a set rate; the guest on the destination
    recomputes its kept data's checksum."""
    p = cli("migrate", "--backend", "qemu", "--hint", "none", "--guest-mib", "256", "--bandwidth", "1gbit",
            "--trials", "1", "--no-probes", "--json", db=tmp_path / "m.db")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    (t,) = out["trials"]
    assert t["arm"] == "qemu-none" and t["status"] == "ok" and t["verified"] is True
    assert t["verification"]["checks"] == {"migration_completed": True, "destination_running": True,
                                           "kept_data_intact": True}
    # 256 MiB at 1 Gbit/s: every page is either sent or detected as zero, over at least one round
    assert t["pages_sent"] + t["pages_zero"] >= 256 * 256 and t["rounds"] >= 1
    assert 0 < t["downtime_ms"] < t["total_ms"]
    assert "--backend qemu" in out["command_line"]


def test_qemu_arms_are_asked_for_never_defaulted():
    from lab.trials.spec import ExperimentSpec, SpecError
    assert not any(a.startswith("qemu-") for a in ExperimentSpec().arms)
    assert not any(a.startswith("qemu-") for a in ExperimentSpec(kind="migrate", inflate_mib=0).arms)
    with pytest.raises(SpecError, match="batch_pages"):
        from lab.trials.spec import validate_workload
        validate_workload(ExperimentSpec(arms=["pfn", "qemu-pfn"], batch_pages=64))
