#!/bin/sh
# The guest agent: one command per line from the host, "ID COMMAND...", run with the
# output captured, answered as the output lines then "@@END ID STATUS".
echo "@@READY $(uname -r) $(cat /sys/module/virtio_balloon/initstate 2>/dev/null || echo missing)"
while read -r id cmd; do
    [ -z "$id" ] && continue
    sh -c "$cmd" 2>&1
    echo "@@END $id $?"
done
echo "@@EOF"
