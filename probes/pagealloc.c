/* pagealloc.c: the kernel's page allocator and user page faults, per target pid.
 *
 * kmem:mm_page_alloc (per order), kmem:mm_page_free (events and pages),
 * kmem:mm_page_free_batched, exceptions:page_fault_user. Attribution is to the
 * task current when the event fires: allocations and faults happen in the
 * faulting task, but frees often run elsewhere (RCU, kworkers, the last unmapper),
 * so per-pid frees are a lower bound.
 *
 * Composed after common.h. The loader checks the running kernel's tracepoint
 * formats and defines HAVE_TP_<event> for each tracepoint that exists and
 * PA_ALLOC_HAS_ORDER / PA_FREE_HAS_ORDER when the `order` field is there.
 */
#define PA_ORDERS 33             /* orders 0..31, and 32 = order unknown */

struct pa_val {
    u64 frees;
    u64 free_pages;
    u64 frees_batched;
    u64 faults;
};

BPF_ARRAY(pa_allocs, u64, LAB_MAX_TARGETS * PA_ORDERS);    /* index: target slot * PA_ORDERS + order */
BPF_ARRAY(pa_events, struct pa_val, LAB_MAX_TARGETS);      /* index: target slot */

static __always_inline struct pa_val *pa_current(void)
{
    int target = lab_target_slot(bpf_get_current_pid_tgid() >> 32);
    if (target < 0)
        return NULL;
    return pa_events.lookup(&target);
}

#ifdef HAVE_TP_mm_page_alloc
TRACEPOINT_PROBE(kmem, mm_page_alloc)
{
    int target = lab_target_slot(bpf_get_current_pid_tgid() >> 32);
    if (target < 0)
        return 0;
#ifdef PA_ALLOC_HAS_ORDER
    u32 order = args->order < PA_ORDERS - 1 ? args->order : PA_ORDERS - 1;
#else
    u32 order = PA_ORDERS - 1;
#endif
    int idx = target * PA_ORDERS + order;
    u64 *c = pa_allocs.lookup(&idx);
    if (c)
        __sync_fetch_and_add(c, 1);
    return 0;
}
#endif

#ifdef HAVE_TP_mm_page_free
TRACEPOINT_PROBE(kmem, mm_page_free)
{
    struct pa_val *v = pa_current();
    if (!v)
        return 0;
    __sync_fetch_and_add(&v->frees, 1);
#ifdef PA_FREE_HAS_ORDER
    __sync_fetch_and_add(&v->free_pages, 1ULL << (args->order & 31));
#else
    __sync_fetch_and_add(&v->free_pages, 1);
#endif
    return 0;
}
#endif

#ifdef HAVE_TP_mm_page_free_batched
TRACEPOINT_PROBE(kmem, mm_page_free_batched)
{
    struct pa_val *v = pa_current();
    if (v)
        __sync_fetch_and_add(&v->frees_batched, 1);
    return 0;
}
#endif

#ifdef HAVE_TP_page_fault_user
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    struct pa_val *v = pa_current();
    if (v)
        __sync_fetch_and_add(&v->faults, 1);
    return 0;
}
#endif
