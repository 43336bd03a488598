"""The doctor's check of the qemu backend: a real boot and a real inflate, not a version probe."""
from __future__ import annotations

import time

from lab.trials.qemu.image import FIX
from lab.trials.qemu.trial import QemuBalloonTrial, QemuTrialFailed, run_qemu_balloon

CHECK_GUEST_MIB, CHECK_INFLATE_MIB = 256, 16


def check_qemu_backend() -> tuple[bool, str, str]:
    """(ok, detail, fix): boot the lab's guest, inflate 16 MiB over QMP, verify, deflate."""
    t0 = time.monotonic()
    try:
        r = run_qemu_balloon(QemuBalloonTrial(arm="qemu-pfn", guest_mib=CHECK_GUEST_MIB,
                                              inflate_mib=CHECK_INFLATE_MIB, workload="idle",
                                              workload_params={"used_share": 0.01, "stale_share": 0.0},
                                              timeout_s=120))
    except QemuTrialFailed as e:
        return False, f"a real boot and inflate failed: {e}", FIX
    env = r["environment"]
    if not r["verified"]:
        bad = [k for k, v in r["verification"]["after_inflate"]["checks"].items() if not v]
        return False, f"the guest booted but the inflate did not verify ({', '.join(bad)})", FIX
    return True, (f"QEMU {env['qemu_version']} booted kernel {env['guest_kernel']} under {env['qemu_accel']} "
                  f"({env['qemu_accel_reason']}) and inflated {r['pages']} pages in {r['requests']} requests, "
                  f"verified ({time.monotonic() - t0:.0f} s in all)"), ""
