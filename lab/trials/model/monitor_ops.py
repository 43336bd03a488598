"""One inflate or deflate driven through the VMM's monitor and the guest's agent, the
checks after it, and the probes told which eventfds are which: what the lab says to
a running VMM + guest pair during a trial.
"""
from __future__ import annotations

import time

from device.api import PAGE_SHIFT
from lab.trials.model.balloon_trial import TrialFailed
from lab.trials.model.processes import LabProcesses


def _stages(guest_rep: dict, dev_before: dict, dev_after: dict, kind: str) -> dict:
    """The SG series' breakdown: transmit is the guest's wait minus the device's own work."""
    d0, d1 = dev_before[kind], dev_after[kind]
    translate = d1["translate_ns"] - d0["translate_ns"]
    discard = d1["discard_ns"] - d0["discard_ns"]
    return {
        "alloc": guest_rep["alloc_ns"],
        "encode": guest_rep["encode_ns"],
        "transmit": max(0, guest_rep["wait_ns"] + guest_rep["config_ns"] - translate - discard),
        "translate": translate,
        "discard": discard,
        "total": guest_rep["total_ns"],
    }

def _merge_reports(reports: list[dict], kind: str) -> dict:
    keys = ("pages", "requests", "kicks", "interrupts", "bytes_on_ring", "descriptors",
            "alloc_ns", "encode_ns", "wait_ns", "config_ns", "total_ns", "short_pages", "alloc_calls",
            "config_writes", "cpu_ns")
    mine = [r for r in reports if r["kind"] == kind]
    out = {k: sum(r[k] for r in mine) for k in keys}
    out["errors"] = [r["error"] for r in mine if r.get("error")]
    return out

def _delta(after: dict, before: dict, keys: tuple[str, ...]) -> dict:
    return {k: after[k] - before[k] for k in keys}

def _hist_delta(after: dict, before: dict) -> dict:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}

def balloon_op(lp: LabProcesses, kind: str, target_pages: int, probes) -> dict:
    """Drive one inflate or deflate through the monitor and collect both sides' view."""
    t = lp.t
    ram = lp.info["ram_bytes"]
    dev0 = lp.qmp.execute("x-balloon-lab-counters")
    if probes is not None:
        probes.clear()
    t0 = time.perf_counter_ns()
    lp.qmp.execute("balloon", {"value": ram - (target_pages << PAGE_SHIFT)})
    res = lp.agent.execute("wait-target", {"target_pages": target_pages, "timeout_s": t.timeout_s},
                           timeout=t.timeout_s + min(30.0, t.timeout_s))
    wall = time.perf_counter_ns() - t0
    reading = probes.read().to_json() if probes is not None else None
    if res.get("error"):
        try:
            lp.check_alive()
        except TrialFailed as e:
            raise TrialFailed(f"{kind} did not complete: {e}; the guest reported: {res['error']}") from e
        raise TrialFailed(f"{kind} did not complete: {res['error']}")
    dev1 = lp.qmp.execute("x-balloon-lab-counters")
    g = _merge_reports(res["reports"], kind)
    if g["errors"]:
        raise TrialFailed(f"{kind} failed in the guest: {g['errors'][0]}")
    keys = ("requests", "pages", "discard_calls", "translations", "bytes_on_ring", "descriptors",
            "refused_pages", "runs", "discard_cpu_ns", "cpu_ns")
    dev = _delta(dev1[kind], dev0[kind], keys)
    return {
        "kind": kind, "target_pages": target_pages, "actual": res["actual"], "wall_ns": wall,
        "pages": g["pages"], "requests": g["requests"], "kicks": g["kicks"], "interrupts": g["interrupts"],
        "bytes_on_ring": g["bytes_on_ring"], "descriptors": g["descriptors"],
        "alloc_calls": g["alloc_calls"], "config_writes": g["config_writes"],
        "discard_calls": dev["discard_calls"], "translations": dev["translations"], "runs": dev["runs"],
        "discard_cpu_ns": dev["discard_cpu_ns"], "cpu_ns": {"guest": g["cpu_ns"], "vmm": dev["cpu_ns"]},
        "device_requests": dev["requests"], "device_pages": dev["pages"], "refused_pages": dev["refused_pages"],
        "run_length_hist": _hist_delta(dev1[kind]["run_length_hist"], dev0[kind]["run_length_hist"]),
        "run_length_pages_hist": _hist_delta(dev1[kind]["run_length_pages_hist"],
                                             dev0[kind]["run_length_pages_hist"]),
        "stages_ns": _stages(g, dev0, dev1, kind),
        "device_wakeups": dev1["device_wakeups"] - dev0["device_wakeups"],
        "device_calls": sum(q["calls"] for q in dev1["queues"].values())
                        - sum(q["calls"] for q in dev0["queues"].values()),
        "budget_yields": dev1.get("budget_yields", 0) - dev0.get("budget_yields", 0),
        "device_errors": {k: v - dev0["errors"].get(k, 0) for k, v in dev1["errors"].items()
                          if v - dev0["errors"].get(k, 0)},
        "memfd_bytes_before": dev0["memfd_allocated_bytes"], "memfd_bytes_after": dev1["memfd_allocated_bytes"],
        "host_pages": dev1.get("host_pages"),
        "rss_bytes": {"vmm": dev1["vmm_rss_bytes"], "guest": dev1["guest_rss_bytes"]},
        "probes": reading,
    }

def verify(lp: LabProcesses, target_pages: int) -> dict:
    g = lp.agent.execute("verify")
    d = lp.qmp.execute("x-balloon-lab-verify")
    checks = {
        "kept_pages_intact": g["held_ok"],
        "balloon_gone_from_memfd": d["ballooned_with_data"] == 0,
        "device_and_driver_agree": g["balloon_digest"] == d["ballooned_digest"]
                                    and g["balloon_pages"] == d["ballooned_pages"],
        "actual_is_target": g["actual"] == target_pages,
    }
    huge = {k: d[k] for k in ("host_page_bytes", "whole_host_pages", "whole_with_data", "partial_host_pages")
            if k in d}
    return {"ok": all(checks.values()), "checks": checks, "kept_pages_checked": g["pages_checked"], **huge,
            "bad_kept_pfns": g["bad_pfns"], "ballooned_with_data": d["ballooned_with_data"],
            "balloon_pages": g["balloon_pages"]}

def attach_probes(probes, lp: LabProcesses) -> None:
    """Attach the probes to both processes and tell them which eventfds are which:
    guest writes on kick fds are kicks, VMM reads of them device wake-ups; VMM writes on
    call fds are interrupts, guest reads of them interrupt handling."""
    probes.attach(list(lp.pids.values()))
    guest, vmm = lp.pids["guest"], lp.pids["vmm"]
    drv = lp.guest_info["driver"]
    for q, fd in drv["kick_fds"].items():
        probes.register_eventfd(guest, fd, int(q), "kick")
    for q, fd in drv["call_fds"].items():
        probes.register_eventfd(guest, fd, int(q), "call")
    for q, fd in lp.info["kick_fds"].items():
        probes.register_eventfd(vmm, fd, int(q), "kick")
    for q, fd in lp.info["call_fds"].items():
        probes.register_eventfd(vmm, fd, int(q), "call")
    if lp.info.get("config_call_fd") is not None:
        probes.register_eventfd(vmm, lp.info["config_call_fd"], 0, "config")
        probes.register_eventfd(guest, drv["config_fd"], 0, "config")
