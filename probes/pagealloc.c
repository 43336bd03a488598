/* pagealloc.c: the kernel's page allocations and user page faults, per target pid.
 *
 * kmem:mm_page_alloc (per order) and exceptions:page_fault_user, as raw tracepoints:
 * the program gets the tracepoint's own arguments (mm_page_alloc: page, order, gfp,
 * migratetype; page_fault_user: address, regs, error code) and no event record is
 * built, so the count is the tracepoint's exactly, at the lowest cost a hook has.
 * Allocations and faults happen in the faulting task, so attribution to the task
 * current when the event fires is exact. Both fire per fault, which a balloon inflate
 * makes few of (the workload's preparation makes many, outside the timed inflate).
 * Page frees are pagefree.c (opt-in: they fire per page in every arm).
 *
 * Composed after common.h. The loader defines HAVE_TP_<event> for each tracepoint the
 * running kernel has, and PA_ALLOC_HAS_ORDER when mm_page_alloc carries its order.
 */
#define PA_ORDERS 33             /* orders 0..31, and 32 = order unknown */

BPF_PERCPU_ARRAY(pa_allocs, u64, LAB_MAX_TARGETS * PA_ORDERS);   /* index: target slot * PA_ORDERS + order */
BPF_PERCPU_ARRAY(pa_faults, u64, LAB_MAX_TARGETS);               /* index: target slot */

#ifdef HAVE_TP_mm_page_alloc
RAW_TRACEPOINT_PROBE(mm_page_alloc)
{
    int target = lab_target_slot(bpf_get_current_pid_tgid() >> 32);
    if (target < 0)
        return 0;
#ifdef PA_ALLOC_HAS_ORDER
    u64 o = ctx->args[1];
    u32 order = o < PA_ORDERS - 1 ? o : PA_ORDERS - 1;
#else
    u32 order = PA_ORDERS - 1;
#endif
    int idx = target * PA_ORDERS + order;
    u64 *c = pa_allocs.lookup(&idx);
    if (c)
        *c += 1;
    return 0;
}
#endif

#ifdef HAVE_TP_page_fault_user
RAW_TRACEPOINT_PROBE(page_fault_user)
{
    int target = lab_target_slot(bpf_get_current_pid_tgid() >> 32);
    if (target < 0)
        return 0;
    u64 *c = pa_faults.lookup(&target);
    if (c)
        *c += 1;
    return 0;
}
#endif
