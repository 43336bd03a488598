/* kicks.c: virtqueue notifications, i.e. write(2)/read(2) on registered eventfds.
 *
 * A kick (guest -> device) is a write to the queue's kick eventfd, an interrupt
 * (device -> guest) a write to its call eventfd, a config change a write to the
 * config eventfd; os.eventfd_write/eventfd_read are plain 8-byte write/read. The
 * loader registers each (tgid, fd) with its queue index and kind, so only those
 * fds count: a hash lookup per write/read, nothing else. A read that returns data
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

BPF_HASH(eventfds, struct efd_key, struct efd_info, 4096);
BPF_HASH(notify_counts, struct notify_key, u64, 4096);
BPF_HASH(reads_inflight, u32, struct efd_info, 4096);     /* tid -> registered fd being read */

static __always_inline struct efd_info *efd_lookup(u64 id, u64 fd)
{
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
    if (e) {
        u32 tid = id;
        struct efd_info copy = *e;
        reads_inflight.update(&tid, &copy);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_read)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    struct efd_info *e = reads_inflight.lookup(&tid);
    if (!e)
        return 0;
    struct efd_info copy = *e;
    reads_inflight.delete(&tid);
    notify_count(id, &copy, args->ret > 0 ? NOTIFY_READ : NOTIFY_READ_EMPTY);
    return 0;
}
