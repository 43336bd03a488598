#!/bin/sh
# Real-guest workloads (docs/WORKLOADS.md maps them to the lab's).
#   workload.sh fill KEEP_MIB STALE_MIB   keep KEEP_MIB of random data in tmpfs (checksummed),
#                                         allocate STALE_MIB more and delete it (free pages
#                                         the host has populated); STALE_MIB "rest" = all that is available
#   workload.sh checksum                  sha256 of the kept data, or "none"
#   workload.sh meminfo                   MemTotal/MemFree/MemAvailable in kB
set -e
cmd=$1; shift
case "$cmd" in
fill)
    keep=$1; stale=$2
    if [ "$keep" -gt 0 ]; then
        dd if=/dev/urandom of=/tmp/keep bs=1M count="$keep" 2>/dev/null
    fi
    if [ "$stale" = rest ]; then
        avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
        room=$(df -m /tmp | awk 'NR == 2 {print $4}')
        stale=$((avail - 32))
        [ "$stale" -gt $((room - 1)) ] && stale=$((room - 1))
        [ "$stale" -lt 0 ] && stale=0
    fi
    if [ "$stale" -gt 0 ]; then
        # fallocate makes tmpfs allocate the pages; the kernel zeroes each (init_on_alloc),
        # so every one is populated on the host (dd from /dev/zero does the same, 3.5x slower
        # under TCG). Their content is zero: a migration would send them as zero pages.
        fallocate -l "${stale}M" /tmp/stale
        rm -f /tmp/stale
    fi
    sync
    echo "keep_mib=$keep stale_mib=$stale" ;;
checksum)
    if [ -f /tmp/keep ]; then sha256sum /tmp/keep | cut -d' ' -f1; else echo none; fi ;;
meminfo)
    awk '/^(MemTotal|MemFree|MemAvailable):/ {sub(":", "", $1); print $1 "=" $2}' /proc/meminfo ;;
*) echo "unknown command $cmd"; exit 2 ;;
esac
