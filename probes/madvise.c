/* madvise.c: madvise(2) and fallocate(2) made by the target pids.
 *
 * How the device discards ballooned memory: madvise(MADV_REMOVE) on its mapping,
 * or fallocate(PUNCH_HOLE|KEEP_SIZE) on the memfd. Enter and exit are paired per
 * thread, so every completed call yields its kernel time. Per (target, syscall,
 * advice-or-mode): calls, kernel ns, errors (negative return), bytes asked for.
 * Log2 histograms of length and of kernel time per syscall.
 *
 * Composed after common.h and, when the stage probe is loaded too, after
 * stages.c, which defines LAB_STAGES and stage_account_syscall() so a call is also
 * charged to the stages its thread is inside.
 *
 * Field names come from the running kernel's tracepoint formats; the loader passes
 * them in as MADV_LEN_FIELD, MADV_ADVICE_FIELD, FALLOC_LEN_FIELD, FALLOC_MODE_FIELD.
 */
#define SC_MADVISE   0
#define SC_FALLOCATE 1
#define SC_OPS       128        /* advice / mode values kept apart; larger ones share SC_OPS - 1 */
#define SC_HIST_SLOTS 65        /* lab_log2_slot() of a u64 is 0..64 */

struct sc_inflight {
    u32 tid;                    /* owner of this entry while ts != 0 */
    u32 kind;
    u32 op;                     /* madvise advice, or fallocate mode */
    u32 target;                 /* the process's target slot */
    u64 ts;
    u64 len;
};

struct sc_val {
    u64 calls;
    u64 ns;
    u64 errors;
    u64 bytes;
};

BPF_ARRAY(sc_inflight, struct sc_inflight, LAB_TID_SLOTS);
/* index: (target slot * 2 + kind) * SC_OPS + op */
BPF_ARRAY(sc_stats, struct sc_val, LAB_MAX_TARGETS * 2 * SC_OPS);
/* index: kind * SC_HIST_SLOTS + log2 slot */
BPF_ARRAY(sc_len_hist, u64, 2 * SC_HIST_SLOTS);
BPF_ARRAY(sc_ns_hist, u64, 2 * SC_HIST_SLOTS);

/* One function per table: BCC rewrites a map only where it is named (not via pointers or macros). */
static __always_inline void sc_len_hist_add(u32 kind, u64 v)
{
    int idx = kind * SC_HIST_SLOTS + lab_log2_slot(v);
    u64 *c = sc_len_hist.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
}

static __always_inline void sc_ns_hist_add(u32 kind, u64 v)
{
    int idx = kind * SC_HIST_SLOTS + lab_log2_slot(v);
    u64 *c = sc_ns_hist.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
}

static __always_inline int sc_enter(u32 kind, u32 op, u64 len)
{
    u64 id = bpf_get_current_pid_tgid();
    int target = lab_target_slot(id >> 32);
    if (target < 0)
        return 0;
    u32 tid = id;
    u32 slot = lab_tid_slot(tid);
    struct sc_inflight *s = sc_inflight.lookup(&slot);
    if (!s)
        return 0;
    if (s->ts && s->tid != tid)
        lab_collision(COLL_SYSCALL);
    s->tid = tid;
    s->kind = kind;
    s->op = op;
    s->target = target;
    s->len = len;
    s->ts = bpf_ktime_get_ns();
    return 0;
}

static __always_inline int sc_exit(u32 kind, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id;
    u32 slot = lab_tid_slot(tid);
    struct sc_inflight *s = sc_inflight.lookup(&slot);
    if (!s || !s->ts || s->tid != tid)
        return 0;              /* not a target, or the call began before we attached */
    u64 dt = bpf_ktime_get_ns() - s->ts;
    u32 op = s->op, skind = s->kind, target = s->target;
    u64 len = s->len;
    s->ts = 0;
    if (skind != kind || target >= LAB_MAX_TARGETS)
        return 0;

    int idx = (target * 2 + kind) * SC_OPS + (op < SC_OPS ? op : SC_OPS - 1);
    struct sc_val *v = sc_stats.lookup(&idx);
    if (v) {
        __sync_fetch_and_add(&v->calls, 1);
        __sync_fetch_and_add(&v->ns, dt);
        if (ret < 0)
            __sync_fetch_and_add(&v->errors, 1);
        else
            __sync_fetch_and_add(&v->bytes, len);
    }
    sc_len_hist_add(kind, len);
    sc_ns_hist_add(kind, dt);
#ifdef LAB_STAGES
    stage_account_syscall(tid, kind, dt);
#endif
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
    return sc_enter(SC_MADVISE, (u32)args->MADV_ADVICE_FIELD, (u64)args->MADV_LEN_FIELD);
}

TRACEPOINT_PROBE(syscalls, sys_exit_madvise)
{
    return sc_exit(SC_MADVISE, (long)args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fallocate)
{
    return sc_enter(SC_FALLOCATE, (u32)args->FALLOC_MODE_FIELD, (u64)args->FALLOC_LEN_FIELD);
}

TRACEPOINT_PROBE(syscalls, sys_exit_fallocate)
{
    return sc_exit(SC_FALLOCATE, (long)args->ret);
}
