/* stages.c: the lab's own stages, seen through Python's `python:audit` USDT marker.
 *
 * The lab's processes call sys.audit("balloon-lab:<stage>:b") when a stage starts
 * and sys.audit("balloon-lab:<stage>:e") when it ends, once per batch (never per
 * page). Per thread a small stack of open stages; per (pid, stage): completed count,
 * total ns between the markers (the probe's own clock, independent of the lab's),
 * and the madvise/fallocate calls and kernel ns made while the thread was inside the
 * stage. Stages nest (inflate > alloc, ...): a syscall is charged to every open
 * stage of its thread, like inclusive time.
 *
 * Composed after common.h and BEFORE madvise.c: it defines LAB_STAGES and
 * stage_account_syscall(), which madvise.c's exit handler calls. The loader puts
 * BCC's generated USDT argument readers for `on_audit` in front of the module and
 * passes the 12-byte event prefix as STAGE_PREFIX_W0 (bytes 0-7, little-endian) and
 * STAGE_PREFIX_W1 (bytes 8-11).
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
};

struct stage_stack {
    u32 depth;                 /* may exceed STAGE_DEPTH; frames above it are not kept */
    u32 pad;
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
    u64 sc_calls[2];           /* [SC_MADVISE], [SC_FALLOCATE] (madvise.c) */
    u64 sc_ns[2];
};

union audit_event {
    char c[32];
    u64 w[4];
};

BPF_HASH(stage_stacks, u32, struct stage_stack, 10240);    /* tid -> open stages */
BPF_HASH(stage_stats, struct stage_key, struct stage_val, 4096);
BPF_ARRAY(stage_anomalies, u64, 4);

static __always_inline void stage_anomaly(int which, u64 n)
{
    u64 *c = stage_anomalies.lookup(&which);
    if (c)
        __sync_fetch_and_add(c, n);
}

static __always_inline struct stage_val *stage_val_of(u64 id, struct stage_name *name)
{
    struct stage_key k = {};
    k.tgid = id >> 32;
    k.name = *name;
    struct stage_val zero = {};
    return stage_stats.lookup_or_try_init(&k, &zero);
}

/* Called by madvise.c for each completed madvise (kind 0) / fallocate (kind 1). */
static __always_inline void stage_account_syscall(u64 id, u32 kind, u64 dt)
{
    u32 tid = id;
    struct stage_stack *st = stage_stacks.lookup(&tid);
    if (!st)
        return;
    u32 d = st->depth;
    u32 k = kind & 1;
#pragma unroll
    for (int i = 0; i < STAGE_DEPTH; i++) {
        if (i < d) {
            struct stage_val *v = stage_val_of(id, &st->f[i].name);
            if (v) {
                __sync_fetch_and_add(&v->sc_calls[k], 1);
                __sync_fetch_and_add(&v->sc_ns[k], dt);
            }
        }
    }
}

static __always_inline void stage_begin(u64 id, struct stage_name *name, u64 now)
{
    u32 tid = id;
    struct stage_stack zero = {};
    struct stage_stack *st = stage_stacks.lookup_or_try_init(&tid, &zero);
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
    st->depth = d + 1;
}

static __always_inline void stage_end(u64 id, struct stage_name *name, u64 now)
{
    u32 tid = id;
    struct stage_stack *st = stage_stacks.lookup(&tid);
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
    u64 start = 0;
#pragma unroll
    for (int i = STAGE_DEPTH - 1; i >= 0; i--) {
        if (found < 0 && i < d &&
            st->f[i].name.w[0] == name->w[0] && st->f[i].name.w[1] == name->w[1]) {
            found = i;
            start = st->f[i].start;
        }
    }
    if (found < 0) {
        stage_anomaly(ANOM_UNMATCHED_END, 1);
        return;
    }
    if (d - 1 > (u32)found)
        stage_anomaly(ANOM_UNCLOSED, d - 1 - found);
    st->depth = found;
    struct stage_val *v = stage_val_of(id, name);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        __sync_fetch_and_add(&v->ns, now - start);
    }
}

int on_audit(struct pt_regs *ctx)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    if (!lab_is_target(id >> 32))
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
        stage_begin(id, &name.n, now);
    else
        stage_end(id, &name.n, now);
    return 0;
}
