"""Where a run came from and how to make it again: the environment section (run,
machine, spec, failed trials) and the reproduce section (the exact command)."""
from __future__ import annotations

from typing import Any, Sequence

from reports.data import ReportData
from fmt.numbers import esc, fmt_bytes
from reports.section_parts import Section, chip, nodata, note, table


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    return '<table class="kv"><tbody>' + "".join(
        f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</tbody></table>"


def environment_section(d: ReportData) -> Section:
    r, env = d.run, d.run.environment
    git = env.get("git_commit")
    git_s = "not a git checkout" if not git else esc(git[:12]) + (" <b>(local changes)</b>" if env.get("git_dirty") else "")
    mem = env.get("memory_bytes")
    run_rows = [
        ("run id", f"<code>{esc(r.id)}</code>"), ("name", esc(r.name)), ("kind", esc(r.kind)),
        ("status", f'<span class="status {esc(r.status)}">{esc(r.status)}</span>'),
        ("created", esc(r.created_at)), ("finished", esc(r.finished_at or "–")),
        ("trials", f"{r.trials_ok} ok, {r.trials_failed} failed, {r.warmups} warm-up"),
        ("probe backend", esc(r.probe_backend or "?") + (f" ({esc('; '.join(d.probe_reasons()[:2]))})"
                                                         if d.probe_reasons() else "")),
        ("database", f"<code>{esc(d.db_path)}</code>"),
    ]
    env_rows = [
        ("host", esc(env.get("hostname", "?"))),
        ("kernel", esc(f"{env.get('kernel', '?')} ({env.get('machine', '?')})")),
        ("CPU", esc(f"{env.get('cpu_model', '?')}, {env.get('cores', '?')} cores ({env.get('cores_usable', '?')} usable)")),
        ("memory", esc(fmt_bytes(mem) if mem else "?") + (f" ({fmt_bytes(env['memory_available_bytes'])} available)"
                                                          if env.get("memory_available_bytes") else "")),
        ("load at start", esc(" ".join(map(str, env.get("loadavg") or [])) or "?")),
        ("CPU governor", esc(env.get("cpu_governor") or "not exposed (no cpufreq: a VM?)")),
        ("Python", esc(f"{env.get('python_version', '?')} ({env.get('python_executable', '?')})")),
        ("numpy / scipy", esc(f"{env.get('numpy', '?')} / {env.get('scipy', '?')}")),
        ("balloon-lab", esc(env.get("balloon_lab", "?")) + f", git {git_s}"),
    ]
    shown = {"hostname", "kernel", "machine", "cpu_model", "cores", "cores_usable", "memory_bytes",
             "memory_available_bytes", "loadavg", "cpu_governor", "python_version", "python_executable", "numpy", "scipy",
             "balloon_lab", "git_commit", "git_dirty", "probe_backend"}
    env_rows += [(k, f"<code>{esc(v)}</code>") for k, v in env.items() if k not in shown]
    spec_rows = [(k, f"<code>{esc(d.spec_text(v, k))}</code>") for k, v in r.spec.items() if not k.startswith("_")]
    body = ['<div class="cols">', "<div><h3>Run</h3>", _kv(run_rows), "</div>",
            "<div><h3>Machine</h3>", _kv(env_rows), "</div>", "</div>",
            "<h3>Spec</h3>", _kv(spec_rows)]
    if r.notes:
        body.append("<h3>Notes</h3><pre>" + esc(r.notes) + "</pre>")
    failed = d.failed()
    if failed:
        rows = [[str(t.idx), chip(t.arm, d.colors), str(t.round), "warm-up" if t.warmup else "measured",
                 f"<code>{esc((t.error or '?').splitlines()[0][:300])}</code>"] for t in failed[:20]]
        body.append(f"<h3>Failed trials ({len(failed)})</h3>" + table(["#", "arm", "round", "", "error"], rows))
        if len(failed) > 20:
            body.append(note(f"… and {len(failed) - 20} more: "
                             f"<code>{esc(d.next_command('show', r.id, '--json', host=d.host, db=d.db_path))}</code>"))
    body.append(note("Timings compare only on the same kernel, CPU, Python build and code; the gate warns when a "
                     "baseline's environment differs."))
    return Section("environment", "Environment", "".join(body))


def reproduce_section(d: ReportData, report_path: str | None) -> Section:
    cmd = d.reproduce_command()
    body = []
    if cmd:
        body.append("<p>The exact command that ran this experiment (every spec field explicit):</p>")
        body.append(f'<pre class="cmd" id="reproduce-command">{esc(cmd)}</pre>')
    else:
        body.append(nodata("This run stored no command line and its spec cannot rebuild one."))
    again = d.next_command("report", d.run.id, output=report_path or "report.html", host=d.host, db=d.db_path)
    show = d.next_command("show", d.run.id, host=d.host, db=d.db_path)
    body.append("<p>This report, again from the stored trials:</p>")
    body.append(f'<pre class="cmd">{esc(again)}</pre>')
    body.append(f'<p>The numbers as text or JSON: <code>{esc(show)} [--json]</code>.'
                " Run from the repository root as root after <code>scripts/setup.sh</code> "
                "(<code>balloon-lab doctor</code> checks the probes).</p>")
    return Section("reproduce", "Reproduce", "".join(body))
