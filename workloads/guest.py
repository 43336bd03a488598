"""The guest program with the lab's workloads: device/guest/process.py's guest, with
`make_workload` handed in, so the device never imports what runs inside it.

    python -m workloads.guest --control-fd FD --agent SOCK [guest options]

The lab's launchers name this program as the VMM's guest (VmmOptions.guest_cmd); its
options are device/guest/options.py's GuestOptions.
"""
from __future__ import annotations

import sys

from device.guest.process import main
from workloads import GUEST_MODULE, make_workload

if __name__ == "__main__":
    sys.exit(main(make_workload=make_workload, prog=GUEST_MODULE))
