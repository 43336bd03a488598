/* common.h: what every balloon-lab probe shares.
 *
 * The loader (probes/bpf.py) composes one BPF module from this header and the
 * concern files (stages.c, madvise.c, kicks.c, pagealloc.c, pagefree.c, then
 * syscalls.c, the one program on the syscall exit that madvise.c and kicks.c share)
 * so that they share the target filter and one clang compile serves all of them.
 * Programs read tracepoint arguments, USDT arguments, the saved user registers of a
 * system call (struct pt_regs, the ptrace ABI's fixed layout) and helpers: the kernel
 * headers on the lab's machines do not match the running kernel, so no other kernel
 * struct is dereferenced.
 *
 * Cost matters on these paths (a madvise per page at GiB scale, a page free per page
 * in every arm), and the kernel measures it per program (bpf_stats, probes/bpf_stats.py):
 * - raw tracepoints, never perf tracepoints: no event record is built per event;
 * - the target check first, so a process that is not probed leaves at once;
 * - counters in per-CPU arrays: plain increments, no atomic instruction, no hash;
 * - targets in one array entry searched by an unrolled loop; per-target counters are
 *   indexed by the target's slot; per-thread state (only where a pair of events must be
 *   matched: a syscall's entry and exit for its kernel time, a stage's markers) lives in
 *   arrays indexed by tid & (LAB_TID_SLOTS - 1), each entry stamped with its owner tid.
 *   LAB_TID_SLOTS is pid_max rounded up to a power of two (capped, see probes/bpf.py):
 *   with pid_max <= the slot count two threads can never share an entry; past the cap a
 *   clash is counted in lab_collisions, never misattributed.
 */
#include <uapi/linux/ptrace.h>

#define LAB_MAX_TARGETS 8

#define COLL_SYSCALL 0      /* a thread's in-flight madvise/fallocate entry taken by another tid */
#define COLL_STAGE   1      /* a thread's open stages taken over by another tid */

struct lab_targets {
    u32 pid[LAB_MAX_TARGETS];   /* tgids; 0 = free slot */
};

BPF_ARRAY(lab_targets, struct lab_targets, 1);
BPF_ARRAY(lab_collisions, u64, 2);             /* rare: shared, atomic adds */

/* The slot (0..LAB_MAX_TARGETS-1) of tgid among the targets, or -1. */
static __always_inline int lab_target_slot(u32 tgid)
{
    int zero = 0;
    struct lab_targets *t = lab_targets.lookup(&zero);
    if (!t || tgid == 0)
        return -1;
#pragma unroll
    for (int i = 0; i < LAB_MAX_TARGETS; i++) {
        if (t->pid[i] == tgid)
            return i;
    }
    return -1;
}

static __always_inline u32 lab_tid_slot(u32 tid)
{
    return tid & (LAB_TID_SLOTS - 1);
}

static __always_inline void lab_collision(int which)
{
    u64 *c = lab_collisions.lookup(&which);
    if (c)
        __sync_fetch_and_add(c, 1);
}

/* Log2 bucket of v: 0 holds 0, k >= 1 holds [2^(k-1), 2^k - 1] (the loader's convention). */
static __always_inline u32 lab_log2_slot(u64 v)
{
    return v ? bpf_log2l(v) : 0;
}
