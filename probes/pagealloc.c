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
#define PA_ORDER_UNKNOWN 255

struct pa_key {
    u32 tgid;
    u32 order;
};

struct pa_val {
    u64 frees;
    u64 free_pages;
    u64 frees_batched;
    u64 faults;
};

BPF_HASH(pa_allocs, struct pa_key, u64, 4096);
BPF_HASH(pa_events, u32, struct pa_val, 1024);

static __always_inline struct pa_val *pa_current(u32 *tgid)
{
    *tgid = bpf_get_current_pid_tgid() >> 32;
    if (!lab_is_target(*tgid))
        return NULL;
    struct pa_val zero = {};
    return pa_events.lookup_or_try_init(tgid, &zero);
}

#ifdef HAVE_TP_mm_page_alloc
TRACEPOINT_PROBE(kmem, mm_page_alloc)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!lab_is_target(tgid))
        return 0;
    struct pa_key k = {};
    k.tgid = tgid;
#ifdef PA_ALLOC_HAS_ORDER
    k.order = args->order < 32 ? args->order : PA_ORDER_UNKNOWN;
#else
    k.order = PA_ORDER_UNKNOWN;
#endif
    pa_allocs.increment(k);
    return 0;
}
#endif

#ifdef HAVE_TP_mm_page_free
TRACEPOINT_PROBE(kmem, mm_page_free)
{
    u32 tgid;
    struct pa_val *v = pa_current(&tgid);
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
    u32 tgid;
    struct pa_val *v = pa_current(&tgid);
    if (v)
        __sync_fetch_and_add(&v->frees_batched, 1);
    return 0;
}
#endif

#ifdef HAVE_TP_page_fault_user
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    u32 tgid;
    struct pa_val *v = pa_current(&tgid);
    if (v)
        __sync_fetch_and_add(&v->faults, 1);
    return 0;
}
#endif
