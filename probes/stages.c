/* stages.c: the lab's own stages, seen through Python's `python:audit` USDT marker.
 *
 * The lab's processes call sys.audit("balloon-lab:<stage>:b") when a stage starts
 * and sys.audit("balloon-lab:<stage>:e") when it ends, once per batch (never per
 * page). Per thread a small stack of open stages; per (pid, stage): completed count,
 * total ns between the markers (the probe's own clock, independent of the lab's),
 * and the madvise/fallocate calls and kernel ns made while the thread was inside the
 * stage. Stages nest (inflate > alloc, ...): a syscall is charged to every open
 * stage of its thread, like inclusive time. Syscalls accumulate in the thread's
 * frames (array memory) and reach the per-stage totals when the stage ends, so a
 * reading shows completed stages only.
 *
 * Composed after common.h and BEFORE madvise.c: it defines LAB_STAGES and
 * stage_account_syscall(), which madvise.c's exit handler calls. The loader puts
 * BCC's generated USDT argument readers for `on_audit` in front of the module and
 * passes the 12-byte event prefix as STAGE_PREFIX_W0 (bytes 0-7, little-endian) and
 * STAGE_PREFIX_W1 (bytes 8-11), and STAGE_TID_SLOTS (a power of two <= LAB_TID_SLOTS:
 * a stack is 232 bytes, so this array is kept smaller than the others).
 */
#define LAB_STAGES 1
#define STAGE_DEPTH 4          /* open stages tracked per thread */
#define STAGE_PREFIX_LEN 12
#define STAGE_NAME_MAX 15

#define ANOM_UNMATCHED_END 0   /* an end with no open stage of that name */
#define ANOM_UNCLOSED      1   /* open stages dropped because an outer stage ended */
#define ANOM_TOO_DEEP      2   /* begin beyond STAGE_DEPTH: not timed */
#define ANOM_MALFORMED     3   /* "balloon-lab:" event whose name or phase is bad */

struct stage_name {
    u64 w[2];                  /* up to 15 chars, NUL padded */
};

struct stage_frame {
    struct stage_name name;
    u64 start;
    u64 sc_calls[2];           /* [SC_MADVISE], [SC_FALLOCATE] made inside, so far */
    u64 sc_ns[2];
};

struct stage_stack {
    u32 tid;                   /* owner (entries are shared by tid & (STAGE_TID_SLOTS - 1)) */
    u32 depth;                 /* may exceed STAGE_DEPTH; frames above it are not kept */
    struct stage_frame f[STAGE_DEPTH];
};

struct stage_key {
    u32 tgid;
    u32 pad;
    struct stage_name name;
};

struct stage_val {
    u64 count;
    u64 ns;
    u64 sc_calls[2];
    u64 sc_ns[2];
};

union audit_event {
    char c[32];
    u64 w[4];
};

BPF_ARRAY(stage_stacks, struct stage_stack, STAGE_TID_SLOTS); /* open stages per thread */
BPF_HASH(stage_stats, struct stage_key, struct stage_val, 4096); /* touched once per stage end */
BPF_ARRAY(stage_anomalies, u64, 4);

static __always_inline void stage_anomaly(int which, u64 n)
{
    u64 *c = stage_anomalies.lookup(&which);
    if (c)
        __sync_fetch_and_add(c, n);
}

/* The thread's stack, or NULL when another thread owns the entry (and `take` is 0). */
static __always_inline struct stage_stack *stage_stack_of(u32 tid, int take)
{
    u32 slot = tid & (STAGE_TID_SLOTS - 1);
    struct stage_stack *st = stage_stacks.lookup(&slot);
    if (!st)
        return NULL;
    if (st->tid != tid) {
        if (!take)
            return NULL;
        if (st->depth)
            lab_collision(COLL_STAGE);
        st->tid = tid;
        st->depth = 0;
    }
    return st;
}

/* Called by madvise.c for each completed madvise (kind 0) / fallocate (kind 1):
 * charged to every open frame of the thread (array memory only, no map lookups). */
static __always_inline void stage_account_syscall(u32 tid, u32 kind, u64 dt)
{
    struct stage_stack *st = stage_stack_of(tid, 0);
    if (!st)
        return;
    u32 d = st->depth;
    u32 k = kind & 1;
#pragma unroll
    for (int i = 0; i < STAGE_DEPTH; i++) {
        if (i < d) {           /* only the owner thread writes its frames: no atomics */
            st->f[i].sc_calls[k] += 1;
            st->f[i].sc_ns[k] += dt;
        }
    }
}

static __always_inline void stage_begin(u32 tid, struct stage_name *name, u64 now)
{
    struct stage_stack *st = stage_stack_of(tid, 1);
    if (!st)
        return;
    u32 d = st->depth;
    if (d >= STAGE_DEPTH) {
        st->depth = d + 1;
        stage_anomaly(ANOM_TOO_DEEP, 1);
        return;
    }
    st->f[d].name = *name;
    st->f[d].start = now;
    st->f[d].sc_calls[0] = 0;
    st->f[d].sc_calls[1] = 0;
    st->f[d].sc_ns[0] = 0;
    st->f[d].sc_ns[1] = 0;
    st->depth = d + 1;
}

static __always_inline void stage_end(u64 id, struct stage_name *name, u64 now)
{
    struct stage_stack *st = stage_stack_of((u32)id, 0);
    if (!st || st->depth == 0) {
        stage_anomaly(ANOM_UNMATCHED_END, 1);
        return;
    }
    u32 d = st->depth;
    if (d > STAGE_DEPTH) {     /* closes a stage that was too deep to keep */
        st->depth = d - 1;
        return;
    }
    int found = -1;
    struct stage_val add = {};
#pragma unroll
    for (int i = STAGE_DEPTH - 1; i >= 0; i--) {
        if (found < 0 && i < d &&
            st->f[i].name.w[0] == name->w[0] && st->f[i].name.w[1] == name->w[1]) {
            found = i;
            add.ns = now - st->f[i].start;
            add.sc_calls[0] = st->f[i].sc_calls[0];
            add.sc_calls[1] = st->f[i].sc_calls[1];
            add.sc_ns[0] = st->f[i].sc_ns[0];
            add.sc_ns[1] = st->f[i].sc_ns[1];
        }
    }
    if (found < 0) {
        stage_anomaly(ANOM_UNMATCHED_END, 1);
        return;
    }
    if (d - 1 > (u32)found)
        stage_anomaly(ANOM_UNCLOSED, d - 1 - found);
    st->depth = found;

    struct stage_key k = {};
    k.tgid = id >> 32;
    k.name = *name;
    struct stage_val zero = {};
    struct stage_val *v = stage_stats.lookup_or_try_init(&k, &zero);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        __sync_fetch_and_add(&v->ns, add.ns);
        __sync_fetch_and_add(&v->sc_calls[0], add.sc_calls[0]);
        __sync_fetch_and_add(&v->sc_calls[1], add.sc_calls[1]);
        __sync_fetch_and_add(&v->sc_ns[0], add.sc_ns[0]);
        __sync_fetch_and_add(&v->sc_ns[1], add.sc_ns[1]);
    }
}

int on_audit(struct pt_regs *ctx)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    if (lab_target_slot(id >> 32) < 0)
        return 0;
    u64 addr = 0;
    bpf_usdt_readarg(1, ctx, &addr);
    union audit_event ev = {};
    if (bpf_probe_read_user_str(ev.c, sizeof(ev.c), (void *)addr) <= 0)
        return 0;
    if (ev.w[0] != STAGE_PREFIX_W0 || (u32)ev.w[1] != STAGE_PREFIX_W1)
        return 0;              /* one of Python's own audit events, not ours */

    /* "<name>:<b|e>" follows the prefix; unrolled, so every index is a constant. */
    union { struct stage_name n; char c[16]; } name = {};
    int colon = -1;
    char phase = 0, term = 1;
#pragma unroll
    for (int i = 0; i <= STAGE_NAME_MAX; i++) {
        if (colon < 0) {
            char c = ev.c[STAGE_PREFIX_LEN + i];
            if (c == ':') {
                colon = i;
                phase = ev.c[STAGE_PREFIX_LEN + i + 1];
                term = ev.c[STAGE_PREFIX_LEN + i + 2];
            } else if (c == 0 || i == STAGE_NAME_MAX) {
                colon = 0;     /* no ':' within 16 chars: malformed */
            } else {
                name.c[i] = c;
            }
        }
    }
    if (colon <= 0 || term != 0 || (phase != 'b' && phase != 'e')) {
        stage_anomaly(ANOM_MALFORMED, 1);
        return 0;
    }
    if (phase == 'b')
        stage_begin((u32)id, &name.n, now);
    else
        stage_end(id, &name.n, now);
    return 0;
}
