#!/bin/sh
# PID 1 of the lab's real Linux guest: mount the basics, load the virtio balloon
# stack, then serve the host's commands on the second serial port (ttyS1).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp
mount -t tmpfs -o size=100% tmp /tmp
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
    insmod /lib/modules/$m.ko || echo "balloon-lab init: insmod $m failed" > /dev/ttyS0
done
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec /bin/sh /lab/agent.sh < /dev/ttyS1 > /dev/ttyS1 2>&1
