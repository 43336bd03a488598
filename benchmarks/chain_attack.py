"""The monitor's answer time while a hostile guest floods the inflate ring with expensive chains.

    python benchmarks/chain_attack.py --ring-size 32768 --json

Starts a real VMM with the raw hostile guest (device/guest/raw_guest.py), fills every entry of
an inflate ring of the given size with one indirect table of 32768 zero-length
descriptors, kicks once, and asks the monitor `query-balloon` every 5 ms until the
device has used every chain. Prints the worst and typical answer times, the time to
use all chains, and the load average it ran under (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.trials.model.attacks import MAX_TABLE, chain_attack  # noqa: E402
from lab.trials.model.hostile_vm import HostileVM  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ring-size", type=int, default=32768)
    p.add_argument("--table-len", type=int, default=None, help="descriptors per indirect table (default: the device's max_chain)")
    p.add_argument("--guest-mib", type=int, default=256)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with HostileVM(a.guest_mib, "pfn", timeout=60.0) as vm:
        res = chain_attack(vm, a.ring_size, a.table_len or MAX_TABLE, a.timeout)
        res["errors"] = vm.errors()
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res) if a.json else json.dumps(res, indent=2))
    return 0 if res["all_used"] and res["vmm_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
