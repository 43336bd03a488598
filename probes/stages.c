/* stages.c: the lab's own stages, seen through Python's `python:audit` USDT marker.
 *
 * The lab's processes call sys.audit("balloon-lab:<stage>:b") when a stage starts and
 * sys.audit("balloon-lab:<stage>:e") when it ends, once per batch (never per page);
 * where one stage ends exactly where the next begins, one marker
 * sys.audit("balloon-lab:<next>:n") does both (a marker is a uprobe trap, the dearest
 * event the lab probes: fewer markers, less cost). Per thread a small stack of open
 * stages; per (target, stage): completed count, total ns between the markers (the
 * probe's own clock, independent of the lab's), and the madvise/fallocate calls (and,
 * with syscall-time, their kernel ns) made while the thread was inside the stage.
 * Stages nest (inflate > alloc, ...): a syscall is charged to every open stage of its
 * thread, like inclusive time. Syscalls accumulate in the thread's frames (array
 * memory) and reach the per-stage totals when the stage ends, so a reading shows
 * completed stages only.
 *
 * Cheap body: the event name is read once (bpf_probe_read_user_str, which returns its
 * length), parsed by word arithmetic from that length (no loop over characters), and
 * the stage name is interned: it has an index in stage_names (the loader enters the
 * lab's own names at load; a name seen first here is entered here: open-ended names,
 * no list in the probe), so frames and totals are indexed arrays, never a hash. This
 * BCC's clang emits no atomic fetch, so entering a name is write-then-verify: two new
 * names entered at the same instant on two CPUs lose that marker (ANOM_NAME_RACE), and
 * one name entered twice is merged by the loader.
 *
 * Composed after common.h and BEFORE madvise.c: it defines LAB_STAGES and
 * stage_account_syscall(), which madvise.c's exit handler calls. The loader puts
 * BCC's generated USDT argument readers for `on_audit` in front of the module and
 * passes the 12-byte event prefix as STAGE_PREFIX_W0 (bytes 0-7, little-endian) and
 * STAGE_PREFIX_W1 (bytes 8-11), and STAGE_TID_SLOTS (a power of two <= LAB_TID_SLOTS).
 */
#define LAB_STAGES 1
#define STAGE_DEPTH 4          /* open stages tracked per thread */
#define STAGE_PREFIX_LEN 12
#define STAGE_NAME_MAX 15
#define STAGE_NAMES 32         /* distinct stage names per session */

#define ANOM_UNMATCHED_END 0   /* an end with no open stage of that name (or a next with none open) */
#define ANOM_UNCLOSED      1   /* open stages dropped because an outer stage ended */
#define ANOM_TOO_DEEP      2   /* begin beyond STAGE_DEPTH: not timed */
#define ANOM_MALFORMED     3   /* "balloon-lab:" event whose name or phase is bad */
#define ANOM_TOO_MANY      4   /* a name beyond STAGE_NAMES distinct ones: not counted */
#define ANOM_NAME_RACE     5   /* two new names interned at once on two CPUs: this marker not counted */

struct stage_name {
    u64 w[2];                  /* up to 15 chars, NUL padded */
};

struct stage_name_table {
    u32 count;                 /* entries claimed (may pass STAGE_NAMES: the rest are refused) */
    u32 pad;
    struct stage_name n[STAGE_NAMES];
};

struct stage_frame {
    u32 name;                  /* index into stage_names */
    u32 pad;
    u64 start;
    u64 sc_calls[2];           /* [SC_MADVISE], [SC_FALLOCATE] made inside, so far */
    u64 sc_ns[2];
};

struct stage_stack {
    u32 tid;                   /* owner (entries are shared by tid & (STAGE_TID_SLOTS - 1)) */
    u32 depth;                 /* may exceed STAGE_DEPTH; frames above it are not kept */
    struct stage_frame f[STAGE_DEPTH];
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

BPF_ARRAY(stage_names, struct stage_name_table, 1);
BPF_ARRAY(stage_stacks, struct stage_stack, STAGE_TID_SLOTS);               /* open stages per thread */
BPF_PERCPU_ARRAY(stage_stats, struct stage_val, LAB_MAX_TARGETS * STAGE_NAMES); /* target * STAGE_NAMES + name */
BPF_PERCPU_ARRAY(stage_anomalies, u64, 6);

static __always_inline void stage_anomaly(int which, u64 n)
{
    u64 *c = stage_anomalies.lookup(&which);
    if (c)
        *c += n;
}

/* The name's index in stage_names, interning it on first sight; -1 when the table is full. */
static __always_inline int stage_name_index(struct stage_name *name)
{
    int zero = 0;
    struct stage_name_table *t = stage_names.lookup(&zero);
    if (!t)
        return -1;
    u32 have = t->count;
#pragma unroll
    for (int i = 0; i < STAGE_NAMES; i++) {
        if (i < have && t->n[i].w[0] == name->w[0] && t->n[i].w[1] == name->w[1])
            return i;
    }
    if (have >= STAGE_NAMES) {
        stage_anomaly(ANOM_TOO_MANY, 1);
        return -1;
    }
    u32 idx = have & (STAGE_NAMES - 1);
    /* w[1] first: a concurrent reader matches only a complete entry (w[0] is never 0) */
    t->n[idx].w[1] = name->w[1];
    asm volatile("" ::: "memory");
    t->n[idx].w[0] = name->w[0];
    t->count = have + 1;
    asm volatile("" ::: "memory");
    if (t->n[idx].w[0] != name->w[0] || t->n[idx].w[1] != name->w[1]) {
        stage_anomaly(ANOM_NAME_RACE, 1);
        return -1;
    }
    return idx;
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

static __always_inline void stage_push(struct stage_stack *st, int name, u64 now)
{
    u32 d = st->depth;
    if (d >= STAGE_DEPTH) {
        st->depth = d + 1;
        stage_anomaly(ANOM_TOO_DEEP, 1);
        return;
    }
    st->f[d].name = name;
    st->f[d].start = now;
    st->f[d].sc_calls[0] = 0;
    st->f[d].sc_calls[1] = 0;
    st->f[d].sc_ns[0] = 0;
    st->f[d].sc_ns[1] = 0;
    st->depth = d + 1;
}

/* Close frame `i` (and any open above it) of the stack, adding it to target's totals. */
static __always_inline void stage_close(struct stage_stack *st, int target, u32 i, u64 now)
{
    if (i >= STAGE_DEPTH)
        return;
    if (st->depth - 1 > i)
        stage_anomaly(ANOM_UNCLOSED, st->depth - 1 - i);
    st->depth = i;
    int idx = target * STAGE_NAMES + (st->f[i].name & (STAGE_NAMES - 1));
    struct stage_val *v = stage_stats.lookup(&idx);
    if (!v)
        return;
    v->count += 1;
    v->ns += now - st->f[i].start;
    v->sc_calls[0] += st->f[i].sc_calls[0];
    v->sc_calls[1] += st->f[i].sc_calls[1];
    v->sc_ns[0] += st->f[i].sc_ns[0];
    v->sc_ns[1] += st->f[i].sc_ns[1];
}

static __always_inline void stage_end(struct stage_stack *st, int target, int name, u64 now)
{
    u32 d = st->depth;
    if (d > STAGE_DEPTH) {     /* closes a stage that was too deep to keep */
        st->depth = d - 1;
        return;
    }
    int found = -1;
#pragma unroll
    for (int i = STAGE_DEPTH - 1; i >= 0; i--) {
        if (found < 0 && i < d && st->f[i].name == name)
            found = i;
    }
    if (found < 0) {
        stage_anomaly(ANOM_UNMATCHED_END, 1);
        return;
    }
    stage_close(st, target, found, now);
}

int on_audit(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    int target = lab_target_slot(id >> 32);
    if (target < 0)
        return 0;
    u64 addr = 0;
    bpf_usdt_readarg(1, ctx, &addr);
    union audit_event ev = {};
    long len = bpf_probe_read_user_str(ev.c, sizeof(ev.c), (void *)addr);   /* with the NUL */
    if (len <= STAGE_PREFIX_LEN || ev.w[0] != STAGE_PREFIX_W0 || (u32)ev.w[1] != STAGE_PREFIX_W1)
        return 0;              /* one of Python's own audit events, not ours */
    u64 now = bpf_ktime_get_ns();

    /* "<name>:<phase>\0" follows the prefix: name bytes [12, len - 3), ':' at len - 3,
     * the phase at len - 2. */
    u32 n = len - STAGE_PREFIX_LEN - 3;          /* name length */
    if (n < 1 || n > STAGE_NAME_MAX) {
        stage_anomaly(ANOM_MALFORMED, 1);
        return 0;
    }
    u32 at = (len - 3) & 31;
    char colon = (char)(ev.w[at >> 3] >> ((at & 7) * 8));
    u32 pp = (len - 2) & 31;
    char phase = (char)(ev.w[pp >> 3] >> ((pp & 7) * 8));
    struct stage_name name = {};
    name.w[0] = (ev.w[1] >> 32) | (ev.w[2] << 32);
    name.w[1] = (ev.w[2] >> 32) | (ev.w[3] << 32);
    name.w[0] &= n >= 8 ? ~0ULL : (1ULL << (8 * n)) - 1;
    name.w[1] &= n <= 8 ? 0 : (1ULL << (8 * (n - 8))) - 1;
    /* a ':' inside the name (a byte equal to 0x3a): the classic has-zero-byte test */
    u64 x0 = name.w[0] ^ 0x3a3a3a3a3a3a3a3aULL, x1 = name.w[1] ^ 0x3a3a3a3a3a3a3a3aULL;
    u64 lo = 0x0101010101010101ULL, hi = 0x8080808080808080ULL;
    if (colon != ':' || ((x0 - lo) & ~x0 & hi) || ((x1 - lo) & ~x1 & hi) ||
        (phase != 'b' && phase != 'e' && phase != 'n')) {
        stage_anomaly(ANOM_MALFORMED, 1);
        return 0;
    }
    int idx = stage_name_index(&name);
    if (idx < 0)
        return 0;
    struct stage_stack *st = stage_stack_of((u32)id, phase != 'e');
    if (!st || (phase == 'e' && st->depth == 0)) {
        stage_anomaly(ANOM_UNMATCHED_END, 1);
        return 0;
    }
    if (phase == 'e') {
        stage_end(st, target, idx, now);
        return 0;
    }
    if (phase == 'n') {        /* the innermost open stage ends where this one begins */
        u32 d = st->depth;
        if (d == 0)
            stage_anomaly(ANOM_UNMATCHED_END, 1);
        else if (d > STAGE_DEPTH)
            st->depth = d - 1;
        else
            stage_close(st, target, d - 1, now);
    }
    stage_push(st, idx, now);
    return 0;
}
