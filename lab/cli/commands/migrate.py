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

from lab.trials.backends import is_qemu_arm
from lab.trials.experiment import load_comparison, run_experiment
from lab.trials.model.migrate_runner import HINTS, SEED_FIGURES, run_trial
from lab.store.db_path import db_option, default_db_path
from lab.cli.checks import checked, fits_in_memory, memory_option, refuse
from lab.trials.spec import DEFAULT_BANDWIDTH, ExperimentSpec, format_bandwidth, load_spec, toml_value
from lab.store.store import Store

JSON_KEYS = ("hint", "total_ms", "downtime_ms", "rounds", "bytes_sent", "pages_sent", "pages_zero", "pages_hinted",
             "verified", "setup_ms", "hint_ms", "converged", "pages_examined", "pages_hinted_then_dirtied",
             "stop_copy_pages", "cpu_s_source", "cpu_s_destination", "cpu_s_guest", "memory", "verification",
             "downtime_parts_ms", "per_round", "hints", "workload", "guest_mib", "bandwidth_bits")
TARGET_RATIO = 0.25


class MigrateSpec(ExperimentSpec):
    """An ExperimentSpec of kind migrate whose stored command line is `balloon-lab migrate ...`
    (with the migration parameters that are not spec fields), so a stored run reproduces."""

    migrate_extra: dict = {}
    qemu_extra: dict = {}

    def command_line(self, command: str = "migrate") -> str:
        hints = list(dict.fromkeys(a.removeprefix("qemu-") for a in self.arms))
        backends = list(dict.fromkeys("qemu" if is_qemu_arm(a) else "lab" for a in self.arms))
        argv = ["balloon-lab", "migrate", "--guest-mib", str(self.guest_mib), "--hint", ",".join(hints),
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


# The paper's setup (an idle 8 GiB guest at 10 Gbit/s, one trial); everything else
# defaults as in `compare` (ExperimentSpec), the seed included.
MIGRATE_DEFAULTS = dict(guest_mib=8192, workload="idle", trials=1, warmups=0, probes=True, bandwidth=DEFAULT_BANDWIDTH)
MIGRATE_FLAGS = {"arms": "--hint"}


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
                                     f"{', '.join(QEMU_HINTS)})", param_hint="--hint")
        arms += ["qemu-" + h for h in hints if h in QEMU_HINTS]
    return arms


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
    lines = ["medians per hint design:", f"{'hint':<14}" + "".join(f"{c:>13}" for c in cols)]
    for arm, rs in by_arm.items():
        cells = [_fmt(_median(rs, "total_ms")), _fmt(_median(rs, "downtime_ms"), "{:.1f}"), _fmt(_median(rs, "rounds")),
                 _fmt(_median(rs, "bytes_sent") / 1e6 if _median(rs, "bytes_sent") is not None else None, "{:.1f}"),
                 _fmt(_median(rs, "pages_sent")), _fmt(_median(rs, "pages_zero")), _fmt(_median(rs, "pages_hinted")),
                 _fmt(_median(rs, "cpu_s_source"), "{:.2f}"), _fmt(_median(rs, "cpu_s_destination"), "{:.2f}"),
                 _fmt(_median(rs, "cpu_s_guest"), "{:.2f}"),
                 _fmt(_median(rs, "memory", "destination_memfd_peak_bytes") / 1e6
                      if _median(rs, "memory", "destination_memfd_peak_bytes") is not None else None, "{:.0f}"),
                 f"{sum(1 for r in rs if r.get('verified'))}/{len(rs) + failed.get(arm, 0)}"]
        lines.append(f"{arm:<14}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def seed_table(by_arm: dict[str, list[dict]], guest_mib: int, bandwidth_bits: int, workload: str) -> str:
    bases = {"lab": _median(by_arm.get("none", []), "total_ms"), "qemu": _median(by_arm.get("qemu-none", []), "total_ms")}
    s, u = SEED_FIGURES["seed"], SEED_FIGURES["upstream"]
    head = (f"total migration time beside the published figures (ours: {guest_mib} MiB guest, "
            f"{bandwidth_bits / 1e9:g} Gbit/s, workload {workload}; theirs: idle 8 GB guest, 10 Gbit/s):")
    lines = [head, f"{'':<14}{'ours':>14}{'ratio':>9}{'seed v2/v3':>14}{'ratio':>9}{'upstream v37':>15}{'ratio':>9}"]
    for arm in by_arm:
        m = _median(by_arm[arm], "total_ms")
        base = bases["qemu" if is_qemu_arm(arm) else "lab"]
        ratio = m / base if m is not None and base else None
        theirs = (s["none_ms"], u["none_ms"]) if arm.removeprefix("qemu-") == "none" else (s["hinted_ms"],
                                                                                            u["hinted_ms"])
        lines.append(f"{arm:<14}{_fmt(m, '{:.0f} ms'):>14}{_fmt(ratio, '{:.3f}'):>9}"
                     f"{theirs[0]:>11.0f} ms{theirs[0] / s['none_ms']:>9.3f}{theirs[1]:>12.0f} ms"
                     f"{theirs[1] / u['none_ms']:>9.3f}")
    for arm in by_arm:
        base = bases["qemu" if is_qemu_arm(arm) else "lab"]
        if base and arm.removeprefix("qemu-") != "none":
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
        lines.append(f"{arm:<14}" + " | ".join(f"{_fmt(v / 1e6 if v is not None else None, '{:.0f}'):>8}" for v in g))
    return "\n".join(lines)


@click.command("migrate")
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML spec file (kind = \"migrate\"); the flags below override its values.")
@click.option("--guest-mib", type=int, default=None, help="Guest RAM in MiB (multiple of 4, 64..65536)."
              + _default("guest_mib"))
@click.option("--hint", "hints", multiple=True, metavar="DESIGN",
              help="none, upstream, bitmap; repeatable or comma-separated (the first is the baseline)."
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
        overrides["workload_params"] = checked("migrate", lambda: dict(parse_param(p) for p in params), MIGRATE_FLAGS)
    spec = checked("migrate", lambda: load_spec(spec_path, overrides), MIGRATE_FLAGS)
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
                    from lab.cli.commands.compare import comparison_json
                    out["comparison"] = comparison_json(run_id, comp)
                click.echo(json.dumps(out, default=float))
            else:
                click.echo(f"run {run_id}\n")
                env = store.get_run(run_id).environment
                if env.get("qemu_accel"):
                    click.echo(f"real stack (qemu-* arms): QEMU {env['qemu_version']} under {env['qemu_accel']} "
                               f"({env['qemu_accel_reason']}), guest kernel {env['guest_kernel']}"
                               + (f", guest append {qemu_guest_append!r}" if qemu_guest_append else "") + "\n")
                click.echo(summary_table(by_arm, failed) + "\n")
                click.echo(seed_table(by_arm, spec.guest_mib, spec.bandwidth, spec.workload) + "\n")
                click.echo(memory_lines(by_arm))
                for t in recs:
                    if t.status != "ok":
                        click.echo(f"\nfailed trial ({t.arm}, round {t.round}): {(t.error or '').splitlines()[0]}")
                if comp is not None and len(by_arm) > 1:
                    from lab.analysis.stats import render_table
                    click.echo("\n" + render_table(comp, ["total_ms", "downtime_ms", "bytes_sent", "pages_sent",
                                                          "cpu_s_source", "cpu_s_destination"]))
    finally:
        if session is not None:
            session.detach()
    ok = all(r.get("verified") for rs in by_arm.values() for r in rs) and not failed
    sys.exit(0 if ok else 1)
