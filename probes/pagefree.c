/* pagefree.c: pages the kernel frees in the target pids' context (opt-in).
 *
 * kmem:mm_page_free (events, and pages: 2^order each) and kmem:mm_page_free_batched
 * (events), as raw tracepoints: the same call sites as the tracepoints, so the same
 * exact counts, with no event record built. No cheaper hook gives this count: the
 * kernel frees a discarded page one at a time (free_pages_prepare fires mm_page_free
 * per page, free_unref_folios also mm_page_free_batched per page), there is no
 * tracepoint per batch, and the functions that free a batch can only be hooked by
 * fentry, which these kernels refuse. So the program runs once (twice, batched) per
 * freed page, in every arm: a 1792 MiB inflate frees 458752 pages whichever protocol
 * asked, and at the per-event cost bpf_stats measures that is more than the 5 % this
 * lab allows its probes on the arms that make a handful of discard calls. Hence
 * opt-in (ProbeSession(concerns=(..., "pagefree")), `--extra-probes pagefree`).
 * Attribution is to the task current when the event fires: frees often run elsewhere
 * (RCU, kworkers, the last unmapper), so per-pid frees are a lower bound.
 *
 * Composed after common.h. HAVE_TP_<event> per tracepoint present, PA_FREE_HAS_ORDER
 * when mm_page_free carries its order.
 */
struct pf_val {
    u64 frees;
    u64 free_pages;
    u64 frees_batched;
};

BPF_PERCPU_ARRAY(pf_events, struct pf_val, LAB_MAX_TARGETS);     /* index: target slot */

#ifdef HAVE_TP_mm_page_free
RAW_TRACEPOINT_PROBE(mm_page_free)
{
    int target = lab_target_slot(bpf_get_current_pid_tgid() >> 32);
    if (target < 0)
        return 0;
    struct pf_val *v = pf_events.lookup(&target);
    if (!v)
        return 0;
    v->frees += 1;
#ifdef PA_FREE_HAS_ORDER
    v->free_pages += 1ULL << (ctx->args[1] & 31);
#else
    v->free_pages += 1;
#endif
    return 0;
}
#endif

#ifdef HAVE_TP_mm_page_free_batched
RAW_TRACEPOINT_PROBE(mm_page_free_batched)
{
    int target = lab_target_slot(bpf_get_current_pid_tgid() >> 32);
    if (target < 0)
        return 0;
    struct pf_val *v = pf_events.lookup(&target);
    if (v)
        v->frees_batched += 1;
    return 0;
}
#endif
