/* kicks.c: virtqueue notifications, i.e. write(2)/read(2) on registered eventfds.
 *
 * A kick (guest -> device) is a write to the queue's kick eventfd, an interrupt
 * (device -> guest) a write to its call eventfd, a config change a write to the
 * config eventfd; os.eventfd_write/eventfd_read are plain 8-byte write/read. The
 * loader registers each (tgid, fd) with its queue index and kind, so only those
 * fds count. Everything is read at the syscall's exit (syscalls.c calls efd_exit for
 * a target's write and read only): the fd from the saved registers, the outcome from
 * the return value. A read that returns data is a wake-up (device: of a kick fd;
 * guest: of a call fd = interrupt handled); a read that fails (EAGAIN on a
 * non-blocking eventfd) is counted apart. The fd's hash lookup is paid only by the
 * targets' reads and writes, a few per request.
 *
 * Composed after common.h.
 */
#define LAB_KICKS 1
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

/* A target's write (is_read 0) or read (1) on `fd` has returned `ret`. */
static __always_inline void efd_exit(u64 id, u64 fd, int is_read, long ret)
{
    struct efd_key k = {};
    k.tgid = id >> 32;
    k.fd = fd;
    struct efd_info *e = eventfds.lookup(&k);
    if (!e)
        return;
    struct notify_key n = {};
    n.tgid = id >> 32;
    n.queue = e->queue;
    n.kind = e->kind;
    n.op = !is_read ? NOTIFY_WRITE : ret > 0 ? NOTIFY_READ : NOTIFY_READ_EMPTY;
    notify_counts.increment(n);
}
