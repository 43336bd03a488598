"""`bench pfn-madvise`'s real-stack figure, measured in the same run.

The lab's ratio is (PFN inflate time) / (a bare loop of the same single-page
discards). The real stack's ratio is defined the same way: QEMU's inflate of the
same size (host wall time, `balloon` to query-balloon) over a bare loop of
single-page madvise(MADV_DONTNEED), the call QEMU makes, on as many populated pages
of an anonymous mapping in this process. With probes, also QEMU's inflate time over
its own madvise kernel time as the probes saw it.
"""
from __future__ import annotations

import mmap
import time

from lab.trials.qemu.trial import QemuBalloonTrial, run_qemu_balloon

PAGE = 4096


def bare_dontneed_loop(pages: int) -> dict:
    """Populate `pages` anonymous pages, then discard them one madvise per page."""
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for off in range(0, pages * PAGE, PAGE):   # per page on purpose: populate each page
            m[off] = 1
        madvise, dontneed = m.madvise, mmap.MADV_DONTNEED
        t0 = time.perf_counter_ns()
        for off in range(0, pages * PAGE, PAGE):   # per page on purpose: the bare per-page syscall cost
            madvise(dontneed, off, PAGE)
        ns = time.perf_counter_ns() - t0
    finally:
        m.close()
    return {"pages": pages, "ns": ns, "ns_per_page": ns / pages}


def real_stack_ratio(guest_mib: int, inflate_mib: int, seed: int, probes=None) -> dict:
    """One qemu-pfn trial and the bare loop beside it; raises QemuTrialFailed."""
    r = run_qemu_balloon(QemuBalloonTrial(arm="qemu-pfn", guest_mib=guest_mib, inflate_mib=inflate_mib,
                                          workload="aged", seed=seed, deflate=False), probes)
    bare = bare_dontneed_loop(r["pages"])
    total = r["stages_ns"]["inflate"]["total"]
    out = {"verified": r["verified"], "environment": r["environment"], "pages": r["pages"],
           "inflate_total_ns": total, "bare_loop_ns": bare["ns"], "bare_ns_per_page": bare["ns_per_page"],
           "ratio": total / bare["ns"]}
    p = r.get("probes") or {}
    if p.get("backend") == "bcc" and p.get("madvise_kernel_ns"):
        out["madvise_calls"] = p["madvise_calls"]
        out["madvise_kernel_ns"] = p["madvise_kernel_ns"]
        out["ratio_to_madvise_kernel"] = total / p["madvise_kernel_ns"]
    return out
