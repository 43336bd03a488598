"""`balloon-lab migrate`: live migration with and without free-page hints, stored and compared.

    balloon-lab migrate --guest-mib 8192 --hint none,upstream,bitmap --bandwidth 10gbit --workload idle

Each hint design is one arm (the first is the baseline); trials are interleaved and
stored like `compare` stores its runs (so `show`, `gate` and `report` apply). The
text output puts our medians beside the published figures (SEED.md): the seed's
2 s -> 0.5 s and upstream FREE_PAGE_HINT's 2970 ms -> 620 ms for an idle 8 GB guest
at 10 Gbit/s.
"""
from __future__ import annotations

import json
import shlex
import statistics
import sys
from pathlib import Path

import click

from lab.experiment import ExperimentInterrupted, load_comparison, run_experiment
from lab.migrate_runner import HINTS, SEED_FIGURES, run_trial
from lab.paths import db_option, default_db_path
from lab.spec import ExperimentSpec, SpecError, format_bandwidth, load_spec, toml_value
from lab.store import Store

JSON_KEYS = ("hint", "total_ms", "downtime_ms", "rounds", "bytes_sent", "pages_sent", "pages_zero", "pages_hinted",
             "verified", "setup_ms", "hint_ms", "converged", "pages_examined", "pages_hinted_then_dirtied",
             "stop_copy_pages", "cpu_s_source", "cpu_s_destination", "cpu_s_guest", "memory", "verification",
             "downtime_parts_ms", "per_round", "hints", "workload", "guest_mib", "bandwidth_bits")
TARGET_RATIO = 0.25


class MigrateSpec(ExperimentSpec):
    """An ExperimentSpec of kind migrate whose stored command line is `balloon-lab migrate ...`
    (with the migration parameters that are not spec fields), so a stored run reproduces."""

    migrate_extra: dict = {}

    def command_line(self, command: str = "migrate") -> str:
        argv = ["balloon-lab", "migrate", "--guest-mib", str(self.guest_mib), "--hint", ",".join(self.arms),
                "--bandwidth", format_bandwidth(self.bandwidth), "--workload", self.workload]
        for k, v in self.workload_params.items():
            argv += ["--param", f"{k}={toml_value(v)}"]
        argv += ["--trials", str(self.trials), "--warmups", str(self.warmups), "--seed", str(self.seed),
                 "--probes" if self.probes else "--no-probes"]
        for k, v in self.migrate_extra.items():
            argv += ["--" + k.replace("_", "-"), f"{v:g}"]
        return shlex.join(argv)


def _hints(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for v in values:
        for h in (x.strip() for x in v.split(",")):
            if not h:
                continue
            if h not in HINTS:
                raise click.BadParameter(f"unknown hint design {h!r} (choose from {', '.join(HINTS)})",
                                         param_hint="--hint")
            if h in out:
                raise click.BadParameter(f"hint design {h!r} given twice", param_hint="--hint")
            out.append(h)
    return out or list(HINTS)


def _median(results: list[dict], key: str, sub: str | None = None) -> float | None:
    vals = []
    for r in results:
        v = r.get(key) if sub is None else (r.get(key) or {}).get(sub)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.append(float(v))
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def summary_table(by_arm: dict[str, list[dict]], failed: dict[str, int]) -> str:
    cols = ("total ms", "downtime ms", "rounds", "MB sent", "pages sent", "zero", "hinted", "cpu src s",
            "cpu dst s", "cpu guest s", "dst memfd MB", "verified")
    lines = ["medians per hint design:", f"{'hint':<10}" + "".join(f"{c:>13}" for c in cols)]
    for arm, rs in by_arm.items():
        cells = [_fmt(_median(rs, "total_ms")), _fmt(_median(rs, "downtime_ms"), "{:.1f}"), _fmt(_median(rs, "rounds")),
                 _fmt(_median(rs, "bytes_sent") / 1e6 if _median(rs, "bytes_sent") is not None else None, "{:.1f}"),
                 _fmt(_median(rs, "pages_sent")), _fmt(_median(rs, "pages_zero")), _fmt(_median(rs, "pages_hinted")),
                 _fmt(_median(rs, "cpu_s_source"), "{:.2f}"), _fmt(_median(rs, "cpu_s_destination"), "{:.2f}"),
                 _fmt(_median(rs, "cpu_s_guest"), "{:.2f}"),
                 _fmt(_median(rs, "memory", "destination_memfd_peak_bytes") / 1e6
                      if _median(rs, "memory", "destination_memfd_peak_bytes") is not None else None, "{:.0f}"),
                 f"{sum(1 for r in rs if r.get('verified'))}/{len(rs) + failed.get(arm, 0)}"]
        lines.append(f"{arm:<10}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def seed_table(by_arm: dict[str, list[dict]], guest_mib: int, bandwidth_bits: int, workload: str) -> str:
    base = _median(by_arm.get("none", []), "total_ms")
    s, u = SEED_FIGURES["seed"], SEED_FIGURES["upstream"]
    head = (f"total migration time beside the published figures (ours: {guest_mib} MiB guest, "
            f"{bandwidth_bits / 1e9:g} Gbit/s, workload {workload}; theirs: idle 8 GB guest, 10 Gbit/s):")
    lines = [head, f"{'':<10}{'ours':>14}{'ratio':>9}{'seed v2/v3':>14}{'ratio':>9}{'upstream v37':>15}{'ratio':>9}"]
    for arm in by_arm:
        m = _median(by_arm[arm], "total_ms")
        ratio = m / base if m is not None and base else None
        theirs = (s["none_ms"], u["none_ms"]) if arm == "none" else (s["hinted_ms"], u["hinted_ms"])
        lines.append(f"{arm:<10}{_fmt(m, '{:.0f} ms'):>14}{_fmt(ratio, '{:.3f}'):>9}"
                     f"{theirs[0]:>11.0f} ms{theirs[0] / s['none_ms']:>9.3f}{theirs[1]:>12.0f} ms"
                     f"{theirs[1] / u['none_ms']:>9.3f}")
    if base:
        for arm in by_arm:
            if arm == "none":
                continue
            m = _median(by_arm[arm], "total_ms")
            ok = m is not None and m <= TARGET_RATIO * base
            lines.append(f"  {arm}: hinted total {_fmt(m)} ms {'<=' if ok else '>'} {TARGET_RATIO} x unhinted "
                         f"{base:.0f} ms = {TARGET_RATIO * base:.0f} ms: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def memory_lines(by_arm: dict[str, list[dict]]) -> str:
    lines = ["host memory during the migration (medians, MB): guest touched | source memfd peak | "
             "destination memfd peak | host peak (both memfds + anonymous RSS of source VMM, guest, destination VMM)"]
    for arm, rs in by_arm.items():
        g = [_median(rs, "memory", k) for k in ("guest_touched_bytes", "source_memfd_peak_bytes",
                                                "destination_memfd_peak_bytes", "host_peak_bytes")]
        lines.append(f"{arm:<10}" + " | ".join(_fmt(v / 1e6 if v is not None else None, "{:8.0f}") for v in g))
    return "\n".join(lines)


@click.command("migrate")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML spec file (kind = \"migrate\"); the flags below override its values.")
@click.option("--guest-mib", type=int, default=None, help="Guest RAM in MiB (default 8192).")
@click.option("--hint", "hints", multiple=True, metavar="DESIGN",
              help="none, upstream, bitmap; repeatable or comma-separated (default: all three; the first is "
                   "the baseline).")
@click.option("--bandwidth", default=None, help="Link rate, e.g. 10gbit (default), 2.5gbit, 800mbit.")
@click.option("--workload", default=None, help="Guest workload (default idle; dirty for convergence tests).")
@click.option("--param", "--workload-param", "params", multiple=True, metavar="KEY=VALUE",
              help="Workload parameter (repeatable).")
@click.option("--trials", type=int, default=None, help="Measured trials per hint design (default 1).")
@click.option("--warmups", type=int, default=None, help="Warm-up trials per design, not in the statistics (default 0).")
@click.option("--seed", type=int, default=None, help="Workload seed (round r uses seed + r; default 1).")
@click.option("--probes/--no-probes", default=None, help="Attach the BCC probes to both VMMs and the guest.")
@click.option("--downtime-limit-ms", type=float, default=300.0, show_default=True,
              help="Stop-and-copy once the rest fits this downtime (QEMU's downtime-limit).")
@click.option("--max-rounds", type=int, default=30, show_default=True, help="Pre-copy rounds before forcing the stop.")
@click.option("--hint-wait-ms", type=float, default=2000.0, show_default=True,
              help="bitmap design: how long round 1 waits for the guest's free-page bitmap.")
@click.option("--settle-s", type=float, default=0.0, show_default=True,
              help="Let a background workload run this long before migrating.")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: every trial and the medians.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def command(spec_path, guest_mib, hints, bandwidth, workload, params, trials, warmups, seed, probes,
            downtime_limit_ms, max_rounds, hint_wait_ms, settle_s, db_path, as_json, quiet) -> None:
    """Migrate a guest from a source VMM to a destination VMM over loopback TCP, per hint design."""
    from lab.spec import parse_param
    overrides: dict = {"kind": "migrate", "inflate_mib": 0}
    if spec_path is None:
        overrides.update(guest_mib=8192, workload="idle", trials=1, warmups=0, seed=1, probes=True,
                         bandwidth="10gbit", arms=list(HINTS))
    for k, v in (("guest_mib", guest_mib), ("bandwidth", bandwidth), ("workload", workload), ("trials", trials),
                 ("warmups", warmups), ("seed", seed), ("probes", probes)):
        if v is not None:
            overrides[k] = v
    try:
        if hints:
            overrides["arms"] = _hints(hints)
        if params:
            overrides["workload_params"] = dict(parse_param(p) for p in params)
        spec = load_spec(spec_path, overrides)
    except (SpecError, click.BadParameter) as e:
        click.echo(f"balloon-lab migrate: bad spec: {e}", err=True)
        sys.exit(2)
    if downtime_limit_ms < 0 or max_rounds < 1 or hint_wait_ms < 0 or settle_s < 0:
        click.echo("balloon-lab migrate: --downtime-limit-ms, --hint-wait-ms and --settle-s must be >= 0 and "
                   "--max-rounds >= 1", err=True)
        sys.exit(2)
    extra = dict(downtime_limit_ms=downtime_limit_ms, max_rounds=max_rounds, hint_wait_ms=hint_wait_ms,
                 settle_s=settle_s)
    spec = MigrateSpec(**spec.to_dict())
    spec.migrate_extra = extra
    notes = "migrate parameters: " + json.dumps(extra)
    from lab.commands.run import open_probes
    session = open_probes(spec.probes)
    path = db_path or default_db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Store(path) as store:
            try:
                run_id = run_experiment(spec, lambda s, arm, rnd: run_trial(s, arm, rnd, session, **extra), store,
                                        progress=not quiet, probe_session=session, notes=notes)
            except ExperimentInterrupted as e:
                click.echo(f"interrupted: run {e.run_id} kept its completed trials", err=True)
                sys.exit(130)
            recs = store.trials(run_id, include_warmups=False)  # medians and PASS/FAIL: measured trials only
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
                       "parameters": extra, "seed_figures": SEED_FIGURES,
                       "trials": [{"arm": t.arm, "round": t.round, "warmup": t.warmup, "status": t.status,
                                   "error": (t.error or "").splitlines()[0] if t.error else None,
                                   **{k: (t.result or {}).get(k) for k in JSON_KEYS}} for t in recs],
                       "medians": {a: {k: _median(rs, k) for k in ("total_ms", "downtime_ms", "rounds", "bytes_sent",
                                                                   "pages_sent", "pages_zero", "pages_hinted",
                                                                   "cpu_s_source", "cpu_s_destination")}
                                   for a, rs in by_arm.items()}}
                if comp is not None:
                    from lab.commands.compare import comparison_json
                    out["comparison"] = comparison_json(run_id, comp)
                click.echo(json.dumps(out, default=float))
            else:
                click.echo(f"run {run_id}\n")
                click.echo(summary_table(by_arm, failed) + "\n")
                click.echo(seed_table(by_arm, spec.guest_mib, spec.bandwidth, spec.workload) + "\n")
                click.echo(memory_lines(by_arm))
                for t in recs:
                    if t.status != "ok":
                        click.echo(f"\nfailed trial ({t.arm}, round {t.round}): {(t.error or '').splitlines()[0]}")
                if comp is not None and len(by_arm) > 1:
                    from lab.stats import render_table
                    click.echo("\n" + render_table(comp, ["total_ms", "downtime_ms", "bytes_sent", "pages_sent",
                                                          "cpu_s_source", "cpu_s_destination"]))
    finally:
        if session is not None:
            session.detach()
    ok = all(r.get("verified") for rs in by_arm.values() for r in rs) and not failed
    sys.exit(0 if ok else 1)
