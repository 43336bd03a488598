/* madvise.c: madvise(2) and fallocate(2) made by the target pids.
 *
 * How the device discards ballooned memory: madvise(MADV_REMOVE) on its mapping,
 * or fallocate(PUNCH_HOLE|KEEP_SIZE) on the memfd. Per (target, syscall,
 * advice-or-mode): calls, errors (negative return), bytes asked for; a log2
 * histogram of lengths per syscall. All of it is read at the syscall's exit, from the
 * saved user registers (syscalls.c calls sc_exit): one program run per call.
 *
 * Kernel time (entry to exit) needs a second program at every syscall's entry and
 * two clock reads, which would double what the probe costs; it is the opt-in concern
 * "syscall-time" (LAB_SYSCALL_TIME): then syscalls.c stamps the entry of each
 * madvise/fallocate of a target in sc_inflight, and sc_exit adds the time and its
 * log2 histogram. Calls that began before the probe attached have no entry stamp:
 * they are counted, with no time.
 *
 * Composed after common.h and, when the stage probe is loaded too, after stages.c,
 * which defines LAB_STAGES and stage_account_syscall() so a call is also charged to
 * the stages its thread is inside.
 */
#define LAB_MADVISE 1
#define SC_MADVISE   0
#define SC_FALLOCATE 1
#define SC_OPS       128        /* advice / mode values kept apart; larger ones share SC_OPS - 1 */
#define SC_HIST_SLOTS 65        /* lab_log2_slot() of a u64 is 0..64 */

struct sc_val {
    u64 calls;
    u64 ns;                     /* kernel time: 0 unless syscall-time is on */
    u64 errors;
    u64 bytes;
};

/* index: (target slot * 2 + kind) * SC_OPS + op */
BPF_PERCPU_ARRAY(sc_stats, struct sc_val, LAB_MAX_TARGETS * 2 * SC_OPS);
/* index: kind * SC_HIST_SLOTS + log2 slot */
BPF_PERCPU_ARRAY(sc_len_hist, u64, 2 * SC_HIST_SLOTS);

#ifdef LAB_SYSCALL_TIME
struct sc_inflight {
    u32 tid;                    /* owner of this entry while ts != 0 */
    u32 pad;
    u64 ts;
};
BPF_ARRAY(sc_inflight, struct sc_inflight, LAB_TID_SLOTS);
BPF_PERCPU_ARRAY(sc_ns_hist, u64, 2 * SC_HIST_SLOTS);

/* syscalls.c's entry program, for a target's madvise/fallocate only. */
static __always_inline void sc_enter(u32 tid)
{
    u32 slot = lab_tid_slot(tid);
    struct sc_inflight *s = sc_inflight.lookup(&slot);
    if (!s)
        return;
    if (s->ts && s->tid != tid)
        lab_collision(COLL_SYSCALL);
    s->tid = tid;
    s->ts = bpf_ktime_get_ns();
}

/* Kernel ns since this thread's entry stamp (0 without one); clears the stamp. */
static __always_inline u64 sc_elapsed(u32 tid)
{
    u32 slot = lab_tid_slot(tid);
    struct sc_inflight *s = sc_inflight.lookup(&slot);
    if (!s || !s->ts || s->tid != tid)
        return 0;
    u64 dt = bpf_ktime_get_ns() - s->ts;
    s->ts = 0;
    return dt;
}
#endif

/* One function per table: BCC rewrites a map only where it is named (not via pointers or macros). */
static __always_inline void sc_len_hist_add(u32 kind, u64 v)
{
    int idx = kind * SC_HIST_SLOTS + lab_log2_slot(v);
    u64 *c = sc_len_hist.lookup(&idx);
    if (c)
        *c += 1;
}

/* A completed madvise (kind SC_MADVISE) or fallocate of target `target`, thread `tid`. */
static __always_inline void sc_exit(int target, u32 tid, u32 kind, u64 op, u64 len, long ret)
{
    u64 dt = 0;
#ifdef LAB_SYSCALL_TIME
    dt = sc_elapsed(tid);
#endif
    int idx = (target * 2 + kind) * SC_OPS + (op < SC_OPS ? op : SC_OPS - 1);
    struct sc_val *v = sc_stats.lookup(&idx);
    if (v) {
        v->calls += 1;
        v->ns += dt;
        if (ret < 0)
            v->errors += 1;
        else
            v->bytes += len;
    }
    sc_len_hist_add(kind, len);
#ifdef LAB_SYSCALL_TIME
    if (dt) {
        int h = kind * SC_HIST_SLOTS + lab_log2_slot(dt);
        u64 *c = sc_ns_hist.lookup(&h);
        if (c)
            *c += 1;
    }
#endif
#ifdef LAB_STAGES
    stage_account_syscall(tid, kind, dt);
#endif
}
