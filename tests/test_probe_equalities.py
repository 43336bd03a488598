"""What the eBPF probes see equals what the lab's processes counted themselves,
for every protocol: the probes are an independent measurement, not a copy."""
from __future__ import annotations

import sys

import pytest

from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.runner import run_balloon
from probes.bpf import ebpf_skip_reason
from probes.session import CONCERNS, DEFAULT_CONCERNS, ProbeSession

pytestmark = pytest.mark.ebpf


@pytest.fixture(scope="module", params=["default", "all"])
def session(request):
    """The default probes, then every probe (the opt-in pagefree and syscall-time too).
    Skips only where eBPF truly cannot work (not root, no BCC), saying why; anywhere
    else (CI runs as root with BCC) a probe that does not load is a failure."""
    missing = ebpf_skip_reason()
    if missing:
        print(f"\nSKIPPING probe equalities: {missing}", file=sys.stderr)
        pytest.skip(missing)
    s = ProbeSession(enabled=True, concerns=DEFAULT_CONCERNS if request.param == "default" else CONCERNS)
    loaded = s.load()
    assert s.backend == "bcc" and loaded, f"eBPF should work here (root, BCC importable) but: {s.reason}"
    yield s
    s.detach()


@pytest.mark.parametrize("protocol,guest,inflate", [("pfn", 1024, 512), ("pfn-ranges", 512, 256),
                                                     ("bitmap", 512, 256), ("chunks", 512, 256)])
def test_probe_counts_equal_process_counts(session, protocol, guest, inflate):
    r = run_balloon(BalloonTrial(protocol=protocol, guest_mib=guest, inflate_mib=inflate), session)
    assert r["verified"]
    p = r["probes"]
    assert p["backend"] == "bcc"
    vmm = p["per_pid"][str(r["pids"]["vmm"])]
    # every discard the device made reached the kernel as one madvise from the VMM
    assert vmm["madvise_calls"] == r["discard_calls"]
    if protocol == "pfn":
        assert r["discard_calls"] == inflate * 256
    # kicks: guest writes on kick eventfds == the driver's own count (EVENT_IDX included);
    # the device's own writes (re-kicks when its work budget ends a wake-up) are apart
    assert p["kicks"] == r["kicks"]
    assert p["device_rekicks"] == r["budget_yields"]
    # device wake-ups: VMM reads of kick eventfds == the VMM's own count
    assert p["device_wakeups"] == r["device_wakeups"]
    # interrupts: VMM writes on call eventfds == the device's own count of calls
    assert p["interrupts"] == r["device_calls"]
    # bytes: every ballooned page, as the madvise calls named them
    assert p["advice"] == {"MADV_REMOVE": r["discard_calls"]}
    assert p["madvise_bytes"] == r["pages"] * 4096
    # the discard stage as the USDT markers saw it holds exactly those syscalls
    assert p["stages"]["discard"]["madvise_calls"] == r["discard_calls"]
    assert p["stages"]["discard"]["count"] == r["requests"]      # one discard stage per request (chain)
    timed = "syscall-time" in session.wanted
    if timed:
        assert 0 < p["stages"]["discard"]["madvise_kernel_ns"] <= p["stages"]["discard"]["ns"]
    else:                                     # not measured is not zero
        assert p["madvise_kernel_ns"] is None and p["stages"]["discard"]["madvise_kernel_ns"] is None
    # page frees (opt-in): every page the discard freed, freed in the VMM's context, and
    # little else (the VMM's own buffers)
    freed = r["memfd_freed_bytes"] // 4096
    if "pagefree" in session.wanted:
        assert freed <= vmm["page_free_pages"] <= freed * 1.02 + 1024, (freed, vmm["page_free_pages"])
    else:
        assert p["page_frees"] is None
    # what the probes cost, measured: every program that ran for the VMM, and the total
    assert p["programs"]["sys_exit"]["events"] >= r["discard_calls"]
    assert p["probe_cost_ms"] == pytest.approx(sum(x["ms"] for x in p["programs"].values()))
    # deflate: no discards, kicks still equal
    d = p["deflate"]
    assert d["kicks"] == r["deflate"]["kicks"]
    assert d["per_pid"][str(r["pids"]["vmm"])]["madvise_calls"] == 0
