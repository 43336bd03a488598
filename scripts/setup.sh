#!/usr/bin/env bash
# balloon-lab set-up: everything a fresh Debian 12 machine needs for the eBPF lab.
#
# Idempotent and quiet: on a ready machine it checks and changes nothing (a few seconds).
# Steps (see ../shared/ENVIRONMENT.md for why each is needed):
#   1. Debian packages: BCC (python3-bpfcc, bpfcc-tools), kernel headers, venv, Chromium,
#      PostgreSQL (the shared results store; tests start private servers with initdb),
#      and the real stack (qemu-system-x86, linux-image-cloud-amd64 for the guest's kernel
#      and virtio modules, busybox-static and cpio for its initramfs).
#   2. Kernel headers linked where BCC looks: /lib/modules/$(uname -r)/{build,source}.
#   3. tracefs on /sys/kernel/tracing and debugfs on /sys/kernel/debug.
#   4. .venv from Debian's /usr/bin/python3 (the one with BCC and USDT markers),
#      --system-site-packages, with the project installed editable with test extras.
#   5. Huge pages for --backing thp: shared-memory THP `advise` (it is `never` at boot).
#      --backing hugetlb needs a hugetlbfs pool the size of the guest; the lab raises
#      /proc/sys/vm/nr_hugepages itself when a hugetlb trial starts (and says so), or set
#      BALLOON_LAB_HUGETLB_MIB=N here to reserve N MiB now.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
SYS_PY=/usr/bin/python3
say() { [ "${BALLOON_LAB_SETUP_VERBOSE:-0}" = 1 ] && echo "setup: $*" >&2 || true; }
act() { echo "setup: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    cat >&2 <<EOF
setup: must run as root. balloon-lab needs root to:
  - install Debian packages (apt-get install python3-bpfcc bpfcc-tools linux-headers-cloud-amd64 python3-venv chromium chromium-driver postgresql qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio)
  - link kernel headers into /lib/modules/$(uname -r)/
  - mount tracefs (/sys/kernel/tracing) and debugfs (/sys/kernel/debug)
  - load eBPF programs (CAP_BPF + CAP_PERFMON)
Re-run as root, e.g.: sudo $0
EOF
    exit 1
fi

# 1. Debian packages ---------------------------------------------------------------
PKGS=(python3-bpfcc bpfcc-tools linux-headers-cloud-amd64 python3-venv python3-dev chromium chromium-driver postgresql
      qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    act "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Kernel headers where BCC looks for them ---------------------------------------
KREL="$(uname -r)"
MODDIR="/lib/modules/$KREL"
if [ ! -e "$MODDIR/build/include" ]; then
    hdr="$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)"
    common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)"
    if [ -z "$hdr" ] || [ -z "$common" ]; then
        echo "setup: linux-headers-cloud-amd64 is installed but no /usr/src/linux-headers-*-cloud-amd64 found" >&2
        exit 1
    fi
    act "linking kernel headers $hdr -> $MODDIR/build"
    mkdir -p "$MODDIR"
    ln -sfn "$hdr" "$MODDIR/build"
    ln -sfn "$common" "$MODDIR/source"
fi

# 3. tracefs and debugfs ------------------------------------------------------------
if ! mountpoint -q /sys/kernel/tracing; then
    act "mounting tracefs on /sys/kernel/tracing"
    mount -t tracefs nodev /sys/kernel/tracing
fi
if ! mountpoint -q /sys/kernel/debug; then
    act "mounting debugfs on /sys/kernel/debug"
    mount -t debugfs nodev /sys/kernel/debug
fi

# 4. The virtual environment -------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)' 2>/dev/null; then
    act "creating $VENV from $SYS_PY (--system-site-packages, for BCC)"
    rm -rf "$VENV"
    "$SYS_PY" -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.balloon-lab-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! (cd / && "$VENV/bin/python" -c 'import lab, fuzz, fmt, numpy, scipy, click, psycopg, procrastinate') 2>/dev/null; then
    act "installing balloon-lab into $VENV (editable, with test extras)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    # (this machine's pip config names local wheel folders that may not exist: not our noise)
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" \
        2> >(grep -v "^WARNING: Location 'file://" >&2)
    echo "$want" > "$stamp"
fi
# 5. Huge pages ----------------------------------------------------------------------
THP=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ -w "$THP" ] && ! grep -Eq '\[(advise|always|within_size|force)\]' "$THP"; then
    act "setting $THP to advise (was: $(sed 's/.*\[\(.*\)\].*/\1/' "$THP")), for --backing thp"
    echo advise > "$THP"
fi
if [ -n "${BALLOON_LAB_HUGETLB_MIB:-}" ]; then
    want=$(( (BALLOON_LAB_HUGETLB_MIB + 1) / 2 ))
    have=$(cat /proc/sys/vm/nr_hugepages)
    if [ "$have" -lt "$want" ]; then
        act "raising /proc/sys/vm/nr_hugepages from $have to $want (BALLOON_LAB_HUGETLB_MIB=$BALLOON_LAB_HUGETLB_MIB)"
        echo "$want" > /proc/sys/vm/nr_hugepages
    fi
fi
say "ready"
