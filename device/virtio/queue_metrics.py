"""Declared counters of the split virtqueue, both ends (device/virtio/driver_queue.py, device_queue.py).

Declared here, beside the two queue modules, so each keeps one job (its end of the ring);
a test checks that DriverQueue.counters() and DeviceQueue.counters() report exactly
these names (tests/test_metric_decl.py). The kicks and calls depend on scheduling under
VIRTIO_RING_F_EVENT_IDX (a kick is skipped while the device still polls, a call while
the driver is still busy), so they are gauges; what the protocol fixes is a counter.
"""
from __future__ import annotations

from device.virtio.metric_decl import COUNTER, GAUGE, Metric, MetricSet

DRIVER_QUEUE_METRICS = MetricSet("device/virtio/queue_metrics.py DRIVER_QUEUE_METRICS", [
    Metric("added", COUNTER, "", "buffers (chains) the driver made available"),
    Metric("indirect_added", COUNTER, "", "of those, chains sent through an indirect descriptor table"),
    Metric("kicks", GAUGE, "", "kick eventfd writes (EVENT_IDX suppresses some)"),
    Metric("notifications_suppressed", GAUGE, "", "kicks the device asked the driver to skip (avail_event)"),
    Metric("used", COUNTER, "", "used-ring entries the driver consumed"),
])

DEVICE_QUEUE_METRICS = MetricSet("device/virtio/queue_metrics.py DEVICE_QUEUE_METRICS", [
    Metric("chains", COUNTER, "", "descriptor chains the device took off the available ring"),
    Metric("descriptors", COUNTER, "", "descriptors in the chains the device accepted"),
    Metric("descriptors_walked", COUNTER, "", "descriptors read, refused chains included: the walk's cost"),
    Metric("indirect_chains", COUNTER, "", "chains that came through an indirect descriptor table"),
    Metric("calls", GAUGE, "", "call eventfd writes (interrupts); EVENT_IDX suppresses some"),
    Metric("calls_suppressed", GAUGE, "", "calls skipped because the driver asked for none (used_event)"),
    Metric("errors.*", COUNTER, "", "ring refusals of this queue, by reason (docs/VIRTQUEUE.md)"),
])
