/* syscalls.c: the one program on the system-call exit that madvise.c and kicks.c share
 * (and, with the opt-in syscall-time concern, the one on the entry).
 *
 * Why one raw tracepoint at the exit: a hook on the system-call path runs for every
 * system call of every process while it is attached (the kernel turns on its slow
 * syscall path for all tasks), so each program there costs the whole machine; a
 * perf tracepoint (syscalls:sys_exit_madvise) also builds an event record before the
 * program runs. At the exit the saved user registers still hold the syscall number
 * (orig_ax) and the arguments (di, si, dx, r10), and ctx->args[1] is the return value:
 * one program, one run per system call, sees calls, advice, lengths, fds and outcomes.
 * A process that is not a target leaves after the target check.
 *
 * The register layout is x86-64's struct pt_regs (the ptrace ABI, fixed); the loader
 * refuses other machines. Syscall numbers come from the loader: NR_MADVISE, NR_FALLOCATE,
 * NR_WRITE, NR_READ. Composed last, after madvise.c (LAB_MADVISE) and/or kicks.c (LAB_KICKS).
 */
struct lab_sysargs {          /* pt_regs from r10 to orig_ax, read in one copy */
    u64 r10, r9, r8, ax, cx, dx, si, di, orig_ax;
};

/* Every system call of each target: what the hook itself costs the targets is this count
 * times the per-call cost the loader measures (probes/costs.py); index: target slot. */
BPF_PERCPU_ARRAY(lab_syscalls, u64, LAB_MAX_TARGETS);

RAW_TRACEPOINT_PROBE(sys_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    int target = lab_target_slot(id >> 32);
    if (target < 0)
        return 0;
    u64 *n = lab_syscalls.lookup(&target);
    if (n)
        *n += 1;
    struct lab_sysargs a = {};
    bpf_probe_read_kernel(&a, sizeof(a), &((struct pt_regs *)ctx->args[0])->r10);
    long ret = (long)ctx->args[1];
    switch (a.orig_ax) {
#ifdef LAB_MADVISE
    case NR_MADVISE:          /* madvise(start, len, advice) */
        sc_exit(target, (u32)id, SC_MADVISE, a.dx, a.si, ret);
        break;
    case NR_FALLOCATE:        /* fallocate(fd, mode, offset, len) */
        sc_exit(target, (u32)id, SC_FALLOCATE, a.si, a.r10, ret);
        break;
#endif
#ifdef LAB_KICKS
    case NR_WRITE:            /* write(fd, buf, count) */
        efd_exit(id, a.di, 0, ret);
        break;
    case NR_READ:
        efd_exit(id, a.di, 1, ret);
        break;
#endif
    default:
        break;
    }
    return 0;
}

#ifdef LAB_SYSCALL_TIME
RAW_TRACEPOINT_PROBE(sys_enter)
{
    long nr = (long)ctx->args[1];      /* in the context: cheaper than the target check */
    if (nr != NR_MADVISE && nr != NR_FALLOCATE)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (lab_target_slot(id >> 32) < 0)
        return 0;
    sc_enter((u32)id);
    return 0;
}
#endif
