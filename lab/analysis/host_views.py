"""A run's trials grouped by host: who ran them, under what load, and per-host statistics.

Timings of two hosts are never pooled: each host gets its own comparison of the arms
(the same statistics as a one-host run), and the identity lines say what each host
was. Used by `show`, `report` and (through the store's host filters) `gate`.
"""
from __future__ import annotations

from typing import Any

from lab.machine import identity as lab_host
from lab.analysis import stats
from lab.store.store import RunInfo, Store


def host_summaries(store: Store, run: RunInfo) -> list[dict[str, Any]]:
    """Per host, in the order its trials were scheduled: identity (of its first trial
    that recorded one), trial counts, the range of the 1-minute load average over its
    trials, and how many attempts were retried."""
    retried: dict[str, int] = {}
    for a in store.attempts(run.id):
        retried[a["host_id"]] = retried.get(a["host_id"], 0) + 1
    out = []
    for h in run.hosts:
        trials = store.trials(run.id, include_warmups=True, host=h)
        ident = next((t.host for t in trials if t.host), None)
        loads = [t.host["load"][0] for t in trials if t.host and t.host.get("load")]
        out.append({"host_id": h, "identity": ident, "trials": len(trials),
                    "ok": sum(t.status == "ok" and not t.warmup for t in trials),
                    "failed": sum(t.status == "failed" for t in trials),
                    "load_1min": [min(loads), max(loads)] if loads else None,
                    "retried_attempts": retried.get(h, 0)})
    return out


def describe_hosts(store: Store, run: RunInfo) -> list[str]:
    """Lines for `show`: one block per host, then the recorded retries."""
    out = [f"  host{'s' if len(run.hosts) > 1 else ''}"
           + (" (timings compared only within a host):" if len(run.hosts) > 1 else ":")]
    for s in host_summaries(store, run):
        load = s["load_1min"]
        out.append("    " + lab_host.describe(s["identity"], s["host_id"]))
        out.append(f"      {s['trials']} trials ({s['ok']} measured ok, {s['failed']} failed), 1-min load "
                   + (f"{load[0]:.2f}-{load[1]:.2f}" if load else "?") + " over its trials"
                   + (f", {s['retried_attempts']} retried attempt(s)" if s["retried_attempts"] else ""))
    attempts = store.attempts(run.id)
    if attempts:
        out.append("  retried attempts:")
        for a in attempts[:10]:
            out.append(f"    trial #{a['idx']} on {a['host_id']}, attempt {a['attempt']} {a['outcome']}: "
                       f"{(a['error'] or '').splitlines()[0] if a['error'] else ''}")
        if len(attempts) > 10:
            out.append(f"    ... and {len(attempts) - 10} more "
                       f"(`{next_command('show', run.id, '--json', db=store.path)}` has them all)")
    return out


def host_comparisons(store: Store, run: RunInfo, hosts: list[str]) -> dict[str, stats.Comparison | None]:
    """Each host's own comparison of the arms (baseline: the first scheduled arm)."""
    out: dict[str, stats.Comparison | None] = {}
    for h in hosts:
        table = store.metric_table(run.id, h)
        base = next((a for a in run.arms if a in table), next(iter(table), None))
        out[h] = stats.compare_arms(table, base) if base is not None else None
    return out
