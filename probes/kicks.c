/* kicks.c: virtqueue notifications, i.e. write(2)/read(2) on registered eventfds.
 *
 * A kick (guest -> device) is a write to the queue's kick eventfd, an interrupt
 * (device -> guest) a write to its call eventfd, a config change a write to the
 * config eventfd; os.eventfd_write/eventfd_read are plain 8-byte write/read. The
 * loader registers each (tgid, fd) with its queue index and kind, so only those
 * fds count. Every write/read on the machine passes here: the cheap target check
 * comes first, the fd's hash lookup only for the targets. A read that returns data
 * is a wake-up (device: of a kick fd; guest: of a call fd = interrupt handled); a
 * read that fails (EAGAIN on a non-blocking eventfd) is counted apart.
 *
 * Composed after common.h. Field names from the running kernel's formats:
 * WRITE_FD_FIELD, READ_FD_FIELD.
 */
#define NOTIFY_WRITE      0
#define NOTIFY_READ       1   /* read returned data */
#define NOTIFY_READ_EMPTY 2   /* read returned an error, e.g. EAGAIN */

struct efd_key {
    u32 tgid;
    u32 fd;
};

struct efd_info {
    u32 queue;
    u32 kind;                 /* 0 kick, 1 call, 2 config, 3 other (loader's table) */
};

struct notify_key {
    u32 tgid;
    u32 queue;
    u32 kind;
    u32 op;
};

struct efd_read {
    u32 tid;                  /* owner while pending */
    u32 pending;
    struct efd_info e;
};

BPF_HASH(eventfds, struct efd_key, struct efd_info, 4096);
BPF_HASH(notify_counts, struct notify_key, u64, 4096);
BPF_ARRAY(reads_inflight, struct efd_read, LAB_TID_SLOTS);   /* registered fd being read, per thread */

static __always_inline struct efd_info *efd_lookup(u64 id, u64 fd)
{
    if (lab_target_slot(id >> 32) < 0)
        return NULL;
    struct efd_key k = {};
    k.tgid = id >> 32;
    k.fd = fd;
    return eventfds.lookup(&k);
}

static __always_inline void notify_count(u64 id, struct efd_info *e, u32 op)
{
    struct notify_key k = {};
    k.tgid = id >> 32;
    k.queue = e->queue;
    k.kind = e->kind;
    k.op = op;
    notify_counts.increment(k);
}

TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
    u64 id = bpf_get_current_pid_tgid();
    struct efd_info *e = efd_lookup(id, args->WRITE_FD_FIELD);
    if (e)
        notify_count(id, e, NOTIFY_WRITE);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
    u64 id = bpf_get_current_pid_tgid();
    struct efd_info *e = efd_lookup(id, args->READ_FD_FIELD);
    if (!e)
        return 0;
    u32 tid = id;
    u32 slot = lab_tid_slot(tid);
    struct efd_read *r = reads_inflight.lookup(&slot);
    if (!r)
        return 0;
    if (r->pending && r->tid != tid)
        lab_collision(COLL_READ);
    r->tid = tid;
    r->e = *e;
    r->pending = 1;
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    u32 slot = lab_tid_slot(tid);
    struct efd_read *r = reads_inflight.lookup(&slot);
    if (!r || !r->pending || r->tid != tid)
        return 0;
    struct efd_info copy = r->e;
    r->pending = 0;
    notify_count(id, &copy, args->ret > 0 ? NOTIFY_READ : NOTIFY_READ_EMPTY);
    return 0;
}
