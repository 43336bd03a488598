/* common.h: what every balloon-lab probe shares.
 *
 * The loader (probes/bpf.py) composes one BPF module from this header and the
 * concern files (madvise.c, kicks.c, pagealloc.c, stages.c) so that they share the
 * target-pid filter and one clang compile serves all of them. Programs read only
 * tracepoint arguments, USDT arguments and helpers: the kernel headers on the lab's
 * machines do not match the running kernel, so no kernel struct is dereferenced.
 */
#include <uapi/linux/ptrace.h>

/* Processes (tgid) the lab watches: the VMM and the guest, or `probe --pid`'s target. */
BPF_HASH(target_pids, u32, u8, 1024);

static __always_inline int lab_is_target(u32 tgid)
{
    return target_pids.lookup(&tgid) != NULL;
}

/* Log2 bucket of v: 0 holds 0, k >= 1 holds [2^(k-1), 2^k - 1] (the loader's convention). */
static __always_inline u32 lab_log2_slot(u64 v)
{
    return v ? bpf_log2l(v) : 0;
}
