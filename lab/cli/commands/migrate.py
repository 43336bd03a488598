"""`balloon-lab migrate`: live migration with and without free-page hints, stored and compared.

    balloon-lab migrate --guest-mib 8192 --arms none,upstream,bitmap --bandwidth 10gbit --workload idle

Each hint design is one arm (the first is the baseline; `--hint`, the option's first
name, still works: stored runs' command lines use it); trials are interleaved and
stored like `compare` stores its runs (so `show`, `gate` and `report` apply). The
guest defaults to compare's size. The text output puts our medians beside the
published figures (reports/published.py, from SEED.md: the seed's 2 s -> 0.5 s and
upstream FREE_PAGE_HINT's 2970 ms -> 620 ms for idle 8 GiB guests), judged only for a
run of comparable size and workload.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import sys
from pathlib import Path

import click

from lab.trials.backends import is_qemu_arm
from lab.trials.experiment import load_comparison, run_experiment
from lab.trials.model.migrate_runner import HINTS, run_trial
from lab.store.db_path import db_option, default_db_path
from lab.cli.checks import checked, fits_in_memory, memory_option, refuse
from lab.trials.spec import DEFAULT_BANDWIDTH, ExperimentSpec, format_bandwidth, load_spec, toml_value
from fmt.columns import format_columns
from lab.store.store import Store
from fmt.text_width import fold
from fmt.numbers import row_formatter, sig
from reports.published import COMPARABLE_SIZE_FACTOR, MIGRATION

JSON_KEYS = ("hint", "total_ms", "downtime_ms", "rounds", "bytes_sent", "pages_sent", "pages_zero", "pages_hinted",
             "verified", "setup_ms", "hint_ms", "converged", "pages_examined", "pages_hinted_then_dirtied",
             "stop_copy_pages", "cpu_s_source", "cpu_s_destination", "cpu_s_guest", "memory", "verification",
             "downtime_parts_ms", "per_round", "hints", "workload", "guest_mib", "bandwidth_bits")


class MigrateSpec(ExperimentSpec):
    """An ExperimentSpec of kind migrate whose stored command line is `balloon-lab migrate ...`
    (with the migration parameters that are not spec fields), so a stored run reproduces."""

    migrate_extra: dict = {}
    qemu_extra: dict = {}

    def command_line(self, command: str = "migrate") -> str:
        hints = list(dict.fromkeys(a.removeprefix("qemu-") for a in self.arms))
        backends = list(dict.fromkeys("qemu" if is_qemu_arm(a) else "lab" for a in self.arms))
        argv = ["balloon-lab", "migrate", "--guest-mib", str(self.guest_mib), "--arms", ",".join(hints),
                "--backend", ",".join(backends),
                "--bandwidth", format_bandwidth(self.bandwidth), "--workload", self.workload]
        if self.qemu_extra.get("guest_append"):
            argv += ["--qemu-guest-append", self.qemu_extra["guest_append"]]
        for k, v in self.workload_params.items():
            argv += ["--param", f"{k}={toml_value(v)}"]
        argv += ["--trials", str(self.trials), "--warmups", str(self.warmups), "--seed", str(self.seed),
                 "--probes" if self.probes else "--no-probes"]
        for k, v in self.migrate_extra.items():
            argv += ["--" + k.replace("_", "-"), f"{v:g}"]
        return shlex.join(argv)


# The paper's workload and link (an idle guest at 10 Gbit/s), one trial; everything else,
# the guest's size and the seed included, defaults as in `compare` (ExperimentSpec).
MIGRATE_DEFAULTS = dict(workload="idle", trials=1, warmups=0, probes=True, bandwidth=DEFAULT_BANDWIDTH)


def _default(name: str) -> str:
    from lab.trials.spec import default_text
    return f"  [default: {default_text(name, MIGRATE_DEFAULTS)}]"


def _backend_arms(hints: list[str], backends: str, explicit: bool = True) -> list[str]:
    """Arms of the chosen backends: the lab's hint designs as they are, the real stack's
    as qemu-<hint> (QEMU implements none and upstream)."""
    names = [b.strip() for b in backends.split(",") if b.strip()]
    bad = [b for b in names if b not in ("lab", "qemu")] or ([] if names else ["(empty)"])
    if bad:
        raise click.BadParameter(f"unknown backend {bad[0]!r} (choose lab, qemu or lab,qemu)", param_hint="--backend")
    arms = [h for h in hints] if "lab" in names else []
    if "qemu" in names:
        from lab.trials.qemu.migrate import QEMU_HINTS
        missing = [h for h in hints if h not in QEMU_HINTS]
        if missing and explicit and "lab" not in names:
            raise click.BadParameter(f"hint design {missing[0]!r} has no real-stack counterpart (QEMU implements "
                                     f"{', '.join(QEMU_HINTS)})", param_hint="--arms")
        arms += ["qemu-" + h for h in hints if h in QEMU_HINTS]
    return arms


def _median(results: list[dict], key: str, sub: str | None = None) -> float | None:
    vals = []
    for r in results:
        v = r.get(key) if sub is None else (r.get(key) or {}).get(sub)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.append(float(v))
    return statistics.median(vals) if vals else None


# Rows of the medians table: label, where the value is in a result, its unit (rows of one
# unit share one scale, so e.g. every CPU time of the table is in the same unit).
SUMMARY_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("total time", ("total_ms",), "ms"), ("downtime", ("downtime_ms",), "ms"),
    ("pre-copy rounds", ("rounds",), ""), ("bytes sent", ("bytes_sent",), "bytes"),
    ("pages sent", ("pages_sent",), ""), ("zero pages (sent as a flag)", ("pages_zero",), ""),
    ("hinted pages (skipped)", ("pages_hinted",), ""),
    ("CPU, source VMM", ("cpu_s_source",), "s"), ("CPU, destination VMM", ("cpu_s_destination",), "s"),
    ("CPU, guest", ("cpu_s_guest",), "s"),
    ("host memory: guest touched", ("memory", "guest_touched_bytes"), "bytes"),
    ("host memory: source memfd peak", ("memory", "source_memfd_peak_bytes"), "bytes"),
    ("host memory: destination memfd peak", ("memory", "destination_memfd_peak_bytes"), "bytes"),
    ("host memory: peak, all processes", ("memory", "host_peak_bytes"), "bytes"),
)


def summary_table(by_arm: dict[str, list[dict]], failed: dict[str, int]) -> str:
    """Medians per hint design: one row per measure, one column per arm."""
    meds = {label: {a: _median(rs, *where) for a, rs in by_arm.items()} for label, where, _u in SUMMARY_ROWS}
    fmts = {u: row_formatter(u, [v for label, _w, uu in SUMMARY_ROWS if uu == u for v in meds[label].values()])
            for u in {u for _l, _w, u in SUMMARY_ROWS}}
    rows = [(label, *("-" if meds[label][a] is None else fmts[u](meds[label][a]) for a in by_arm))
            for label, _w, u in SUMMARY_ROWS]
    rows.append(("verified", *(f"{sum(1 for r in rs if r.get('verified'))}/{len(rs) + failed.get(a, 0)}"
                               for a, rs in by_arm.items())))
    return ("medians per hint design (host peak: both memfds + anonymous RSS of source VMM, guest, destination "
            "VMM):\n" + format_columns(("", *by_arm), rows, right=set(range(1, len(by_arm) + 1))))


def published_lines(by_arm: dict[str, list[dict]], guest_mib: int, bandwidth_bits: int, workload: str) -> str:
    """Ours beside the published migration times (SEED.md): each hinted arm's total as a
    share of the unhinted arm's. Judged only against figures measured at a comparable
    size with the same workload; the others are shown for reference, with their source."""
    lines = [f"published migration times beside ours (this run: {guest_mib} MiB guest, workload {workload}, "
             f"{bandwidth_bits / 1e9:g} Gbit/s):"]
    ours = []
    for arm in by_arm:
        base = "qemu-none" if is_qemu_arm(arm) else "none"
        m, b = _median(by_arm[arm], "total_ms"), _median(by_arm.get(base, []), "total_ms")
        if arm != base and m is not None and b:
            ours.append((arm, m, b))
    lines.append("  ours: " + ("; ".join(f"{a} {sig(m)} ms = {m / b:.3f} x {'qemu-none' if is_qemu_arm(a) else 'none'} "
                                         f"({sig(b)} ms)" for a, m, b in ours) or "no hinted arm beside an unhinted one"))
    for p in MIGRATION:
        base = p.arm_times_ms.get("none")
        theirs = "; ".join(f"{a} {sig(t)} ms" + (f" = {t / base:.3f} x none" if base and a != "none" else "")
                           for a, t in p.arm_times_ms.items())
        judged = []
        for arm, m, b in ours if p.comparable(guest_mib, workload) and base else ():
            t = p.arm_times_ms.get(arm.removeprefix("qemu-"))
            if t is not None:
                ok = m / b <= t / base
                judged.append(f"      {arm}: {m / b:.3f} x none {'<=' if ok else '>'} published {t / base:.3f} x: "
                              + ("reproduced" if ok else "NOT reproduced (slower than published)"))
        why = ("judged: this run is comparable" if judged else "comparable, but no arm of this run to judge"
               if p.comparable(guest_mib, workload) else "for reference")
        lines += [f"  {p.label} ({why}):", f"      {theirs}; source: {p.source}"] + judged
    if not any(p.comparable(guest_mib, workload) for p in MIGRATION):
        sizes = sorted({p.guest_mib for p in MIGRATION if p.workload})
        lines.append(f"  not judged: the published guests are {', '.join(f'{g // 1024} GiB' for g in sizes)}; a run is "
                     f"judged within {COMPARABLE_SIZE_FACTOR:g}x of that size with the same workload")
    return fold("\n".join(lines))


@click.command("migrate")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML spec file (kind = \"migrate\"); the flags below override its values.")
@click.option("--guest-mib", type=int, default=None, help="Guest RAM in MiB (multiple of 4, 64..65536)."
              + _default("guest_mib"))
@click.option("--arms", "--hint", "hints", multiple=True, metavar="DESIGNS",
              help="Hint designs: none, upstream, bitmap; comma-separated or repeatable (the first is the "
                   "baseline). --hint is its earlier name, kept so stored command lines still run."
                   "  [default: all three]")
@click.option("--bandwidth", default=None, help="Link rate, e.g. 10gbit, 2.5gbit, 800mbit." + _default("bandwidth"))
@click.option("--workload", default=None, help="Guest workload (dirty for convergence tests)." + _default("workload"))
@click.option("--workload-param", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Workload parameter (repeatable).")
@click.option("--trials", type=int, default=None, help="Measured trials per hint design (>= 1)." + _default("trials"))
@click.option("--warmups", type=int, default=None, help="Warm-up trials per design, not in the statistics (>= 0)."
              + _default("warmups"))
@click.option("--seed", type=int, default=None, help="Random seed of the workload layout (round r uses seed + r)."
              + _default("seed"))
@click.option("--probes/--no-probes", default=None, help="Attach the BCC probes to both VMMs and the guest."
              + _default("probes"))
@click.option("--downtime-limit-ms", type=float, default=300.0, show_default=True,
              help="Stop-and-copy once the rest fits this downtime (QEMU's downtime-limit).")
@click.option("--max-rounds", type=int, default=30, show_default=True, help="Pre-copy rounds before forcing the stop.")
@click.option("--hint-wait-ms", type=float, default=2000.0, show_default=True,
              help="bitmap design: how long round 1 waits for the guest's free-page bitmap.")
@click.option("--settle-s", type=float, default=0.0, show_default=True,
              help="Let a background workload run this long before migrating.")
@click.option("--backend", "backends", default="lab", show_default=True, metavar="lab|qemu|lab,qemu",
              help="Migrate the lab's model, real QEMU + a Linux guest (arms qemu-none, qemu-upstream), or both "
                   "in one interleaved run.")
@click.option("--qemu-guest-append", default="", metavar="ARGS",
              help="Extra kernel command line for the real guest, e.g. init_on_alloc=0 (docs/REAL_STACK.md).")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: every trial and the medians.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@memory_option
def command(spec_path, guest_mib, hints, bandwidth, workload, params, trials, warmups, seed, probes,
            downtime_limit_ms, max_rounds, hint_wait_ms, settle_s, backends, qemu_guest_append, db_path, as_json,
            quiet) -> None:
    """Migrate a guest from a source VMM to a destination VMM over loopback TCP, per hint design."""
    from lab.trials.spec import parse_param
    overrides: dict = {"kind": "migrate", "inflate_mib": 0}
    if spec_path is None:
        overrides.update(MIGRATE_DEFAULTS, arms=list(HINTS))
    for k, v in (("guest_mib", guest_mib), ("bandwidth", bandwidth), ("workload", workload), ("trials", trials),
                 ("warmups", warmups), ("seed", seed), ("probes", probes)):
        if v is not None:
            overrides[k] = v
    if hints or backends != "lab":
        try:
            named = [h.strip() for v in hints for h in v.split(",") if h.strip()]
            overrides["arms"] = _backend_arms(named or list(HINTS), backends, explicit=bool(hints))
        except click.BadParameter as e:
            refuse("migrate", e.format_message())
    if params:
        overrides["workload_params"] = checked("migrate", lambda: dict(parse_param(p) for p in params))
    spec = checked("migrate", lambda: load_spec(spec_path, overrides))
    fits_in_memory("migrate", spec)
    for flag, v, low in (("--downtime-limit-ms", downtime_limit_ms, 0), ("--max-rounds", max_rounds, 1),
                         ("--hint-wait-ms", hint_wait_ms, 0), ("--settle-s", settle_s, 0)):
        if v < low:
            refuse("migrate", f"{flag}: {v:g} is out of range (allowed: >= {low})")
    extra = dict(downtime_limit_ms=downtime_limit_ms, max_rounds=max_rounds, hint_wait_ms=hint_wait_ms,
                 settle_s=settle_s)
    spec = MigrateSpec(**spec.to_dict())
    spec.migrate_extra = extra
    spec.qemu_extra = {"guest_append": qemu_guest_append} if qemu_guest_append else {}
    notes = "migrate parameters: " + json.dumps({**extra, **spec.qemu_extra})
    from lab.trials.probing import open_probes
    session = open_probes(spec.probes)
    path = db_path or default_db_path()
    try:
        with Store(path) as store:
            def trial(s, arm: str, rnd: int) -> dict:
                if is_qemu_arm(arm):          # the real stack: source + destination QEMU
                    from lab.trials.qemu.migrate import run_qemu_migrate_trial
                    return run_qemu_migrate_trial(s, arm, session, downtime_limit_ms, qemu_guest_append)
                return run_trial(s, arm, rnd, session, **extra)
            # Ctrl-C or SIGTERM: the run is marked interrupted, lab/cli/group.py says so in one line
            run_id = run_experiment(spec, trial, store, progress=not quiet, probe_session=session, notes=notes)
            recs = store.trials(run_id, include_warmups=False)  # medians and judgments: measured trials only
            by_arm: dict[str, list[dict]] = {a: [] for a in spec.arms}
            failed: dict[str, int] = {}
            for t in recs:
                if t.status == "ok" and t.result:
                    by_arm.setdefault(t.arm, []).append(t.result)
                else:
                    failed[t.arm] = failed.get(t.arm, 0) + 1
            comp = load_comparison(store, run_id)
            if as_json:
                out = {"run_id": run_id, "command_line": spec.command_line("migrate"), "spec": spec.to_dict(),
                       "parameters": extra,
                       "published": [{**dataclasses.asdict(p), "judged": p.comparable(spec.guest_mib, spec.workload)}
                                     for p in MIGRATION],
                       "trials": [{"arm": t.arm, "round": t.round, "warmup": t.warmup, "status": t.status,
                                   "error": (t.error or "").splitlines()[0] if t.error else None,
                                   **{k: (t.result or {}).get(k) for k in JSON_KEYS}} for t in recs],
                       "medians": {a: {k: _median(rs, k) for k in ("total_ms", "downtime_ms", "rounds", "bytes_sent",
                                                                   "pages_sent", "pages_zero", "pages_hinted",
                                                                   "cpu_s_source", "cpu_s_destination")}
                                   for a, rs in by_arm.items()}}
                if comp is not None:
                    from lab.cli.commands.compare import comparison_json
                    out["comparison"] = comparison_json(run_id, comp)
                click.echo(json.dumps(out, default=float))
            else:
                click.echo(f"run {run_id}\n")
                env = store.get_run(run_id).environment
                if env.get("qemu_accel"):
                    click.echo(fold(f"real stack (qemu-* arms): QEMU {env['qemu_version']} under {env['qemu_accel']} "
                                    f"({env['qemu_accel_reason']}), guest kernel {env['guest_kernel']}"
                                    + (f", guest append {qemu_guest_append!r}" if qemu_guest_append else "")) + "\n")
                click.echo(summary_table(by_arm, failed) + "\n")
                click.echo(published_lines(by_arm, spec.guest_mib, spec.bandwidth, spec.workload))
                for t in recs:
                    if t.status != "ok":
                        click.echo("\n" + fold(f"failed trial ({t.arm}, round {t.round}): "
                                                f"{(t.error or '').splitlines()[0]}", hang="    "))
                if comp is not None and len(by_arm) > 1:
                    from lab.analysis.stats import render_table
                    click.echo("\n" + render_table(comp, ["total_ms", "downtime_ms", "bytes_sent", "pages_sent",
                                                          "cpu_s_source", "cpu_s_destination"], shared_units=True))
    finally:
        if session is not None:
            session.detach()
    ok = all(r.get("verified") for rs in by_arm.values() for r in rs) and not failed
    sys.exit(0 if ok else 1)
