"""The guest process: its page allocator, the balloon, hint and reporting drivers, its page data.

    alloc_policy.py           How the guest's balloon driver picks the pages it gives: an arm parameter.
    balloon_driver.py         The guest's virtio-balloon driver: negotiation, rings in guest RAM, inflate, deflate, stats.
    buddy.py                  The guest kernel model's page allocator: a binary buddy allocator (orders 0..10)
    hint_driver.py            Guest side of free-page hinting: queue 3 (upstream FREE_PAGE_HINT) and queue 5 (seed bitmap).
    migration_side.py         The guest's half of migration: requests the VMM starts, and the guest's own check.
    options.py                The guest's launch record: GuestOptions, its command line and its parser.
    page_contents.py          What the guest's pages hold, and proof that the balloon left them alone.
    page_reporting_driver.py  Guest side of free page reporting: Linux's mm/page_reporting.c over the lab's buddy allocator.
    process.py                The guest process: guest kernel model, virtio-balloon driver, agent; workloads handed in.
    raw_guest.py              A raw, hostile guest: the control protocol and split rings written from the docs alone.
    ring_peer.py              The guest's half of the ring's floor (device/vmm/ring_floor.py): a bare round trip.
"""
