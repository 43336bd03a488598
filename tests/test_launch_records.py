"""The processes' launch records (device/virtio/launch.py: VmmOptions, GuestOptions): one
typed record per process, its command line and the parser that builds it back; a trial
built from a spec in one place (BalloonTrial.from_spec); the guest's workloads handed in."""
from __future__ import annotations

import dataclasses
import sys

import pytest

from device.api import PROTOCOL_NAMES, PROTOCOLS, GuestOptions, VmmOptions
from lab.trials.model.balloon_trial import BalloonTrial
from lab.trials.model.processes import LabProcesses, guest_options, vmm_options
from lab.trials.spec import ExperimentSpec


def test_the_vmm_record_round_trips_through_its_command_line():
    guest = GuestOptions(wire_format="chunks", batch_pages=64, timeout_s=2.5, halt_poll_us=7, hint="bitmap",
                         backing="thp", alloc_policy="hugepage-aware", reporting=True, reporting_order=10,
                         reporting_capacity=16, reporting_delay_ms=300, init_on_alloc=True, log_level="INFO")
    vmm = VmmOptions(guest_mib=1536, protocol="pfn-ranges", discard="punch-hole", backing="thp",
                     partial_tracking="qemu", reporting=True, monitor="/tmp/m.sock", agent="/tmp/a.sock",
                     incoming="tcp:127.0.0.1:0", hint="upstream", poll_us=5, log_level="DEBUG",
                     guest_cmd="python3 -m workloads.guest", x_unsealed_ram=True, guest_args=tuple(guest.to_argv()))
    assert VmmOptions.from_argv(vmm.to_argv()) == vmm
    back = GuestOptions.from_argv(["--control-fd", "3", "--agent", "/tmp/a.sock", *vmm.guest_args])
    assert dataclasses.replace(back, control_fd=None, agent=None) == guest
    assert VmmOptions.from_argv(["--guest-mib", "64", "--monitor", "m", "--agent", "a"]) == \
        VmmOptions(guest_mib=64, monitor="m", agent="a")           # every default is the record's


def test_each_process_refuses_what_its_record_does_not_allow(capsys):
    with pytest.raises(SystemExit) as e:
        VmmOptions.from_argv(["--guest-mib", "64", "--monitor", "m", "--agent", "a", "--protocol", "carrier-pigeon"])
    assert e.value.code == 2 and "--protocol" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        GuestOptions.from_argv(["--control-fd", "3", "--agent", "a", "--wire-format", "pfn-ranges"])  # a protocol
    assert "--wire-format" in capsys.readouterr().err


def test_a_trial_is_built_from_its_spec_in_one_place():
    spec = ExperimentSpec(arms=["pfn", "bitmap"], guest_mib=1024, inflate_mib=100.5, workload="fragment",
                          seed=7, bitmap_pages_per_request=4096, discard="punch-hole", backing="thp",
                          guest_init_on_alloc=True)
    t = BalloonTrial.from_spec(spec, "bitmap", rnd=3, deflate=False)
    assert (t.protocol, t.guest_mib, t.inflate_mib, t.workload, t.seed, t.batch_pages, t.discard, t.backing,
            t.init_on_alloc, t.deflate) == ("bitmap", 1024, 100.5, "fragment", 10, 4096, "punch-hole", "thp", True, False)
    assert BalloonTrial.from_spec(spec, "pfn").batch_pages == PROTOCOLS["pfn"].max_batch
    assert t.target_pages == 100.5 * 256
    # the trial's launch records: the VMM gets the protocol, the guest its wire format
    g = guest_options(t)
    v = vmm_options(t, "m", "a", g)
    assert (v.protocol, g.wire_format, g.batch_pages) == ("bitmap", "bitmap", 4096)
    assert "workloads.guest" in v.guest_cmd and list(v.guest_args) == g.to_argv()
    for name in PROTOCOL_NAMES:
        assert guest_options(BalloonTrial(protocol=name)).wire_format == PROTOCOLS[name].wire_format


def test_the_guest_runs_workloads_only_when_they_are_handed_in():
    """device/guest/process.py imports no workload: run bare (its own __main__), it
    refuses a workload; run as workloads/guest.py (the lab's guest), it prepares one."""
    bare = LabProcesses(BalloonTrial(guest_mib=256, inflate_mib=16),
                        vmm={"guest_cmd": f"{sys.executable} -m device.guest.process"})
    try:
        with pytest.raises(Exception, match="without workloads"):
            bare.agent.execute("workload-prepare", {"name": "idle", "params": {}, "seed": 1})
    finally:
        bare.close()
    lab = LabProcesses(BalloonTrial(guest_mib=256, inflate_mib=16))
    try:
        assert lab.agent.execute("workload-prepare", {"name": "idle", "params": {}, "seed": 1})["workload"] == "idle"
    finally:
        lab.close()
