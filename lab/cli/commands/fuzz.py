"""`balloon-lab fuzz`: hostile ring contents against the real device code, with the memfd as oracle.

Exit 0 when every execution passed, 1 when any crashed, hung, took a wake-up over the
50 ms CPU bound or discarded a page the guest never named (the failing cases are written as JSON, ready for
tests/fuzz_corpus/), 2 for bad options. `--replay PATH` runs saved cases instead.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from lab.paths import out_dir


def _progress(total: int, quiet: bool):
    last = [0.0]

    def say(done: int, elapsed: float) -> None:
        if quiet or elapsed - last[0] < 10:
            return
        last[0] = elapsed
        rate = done / elapsed if elapsed else 0
        eta = (total - done) / rate if rate else 0
        click.echo(f"  {done:,}/{total:,} execs  {rate:,.0f}/s  elapsed {elapsed:.0f} s  ETA {eta:.0f} s", err=True)
    return say


def _write_cases(directory: Path, name: str, cases: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with open(path, "w") as f:
        for c in cases:
            f.write(json.dumps(c, sort_keys=True) + "\n")
    return path


@click.command("fuzz")
@click.option("--execs", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Executions in total (split over the workers).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: the same seed and workers repeat a run.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: one per CPU).")
@click.option("--exec-timeout", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
              help="CPU seconds one execution may use before it counts as a hang (and 10x that in "
                   "wall-clock time, for a device blocked in a system call).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where failing cases go (default: <repo>/out/fuzz).")
@click.option("--save-corpus", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write one case per behaviour seen (JSON lines) here, e.g. tests/fuzz_corpus.")
@click.option("--corpus-max", type=click.IntRange(min=1), default=600, show_default=True,
              help="At most this many cases in the saved corpus (one per kind of outcome first).")
@click.option("--replay", type=click.Path(exists=True, path_type=Path), default=None,
              help="Run the saved cases in this file or directory instead of fuzzing.")
@click.option("--target", "family", type=click.Choice(["rings", "control", "migration", "control+migration", "all"]),
              default="rings", show_default=True,
              help="rings: decoders, ring walker, device queues. control: message sequences on the control "
                   "socket. migration: a guest turning hostile during a live migration. all: every target.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def command(execs, seed, workers, exec_timeout, out, save_corpus, corpus_max, replay, family, as_json,
            quiet) -> None:
    """Fuzz the balloon device as a hostile guest: garbage rings, descriptor loops, chains in the
    MMIO hole, truncated and oversized bitmaps, bad chunks, over the decoders, the ring walker and
    the device's inflate/deflate/stats/hint/reporting queues (--target rings); message sequences on the
    control socket (--target control); a guest turning hostile during a live migration (--target
    migration; --target all: every one); in-process over a real memfd, on the VMM's own event-loop
    code with its real per-wake-up budget. A run counts crashes, hangs (an execution past
    --exec-timeout), slow wake-ups (one event-loop wake-up over the 50 ms CPU bound, on any target)
    and out-of-range discards (a page lost its data, per SEEK_DATA on the memfd, although the guest
    never named it)."""
    from fuzz import corpus, engine, provenance

    here = provenance.source_digest()
    if replay is not None:
        cases = corpus.load_corpus(replay)
        elsewhere = provenance.found_elsewhere(cases, here)
        if elsewhere:
            click.echo(f"balloon-lab fuzz: {sum(c.get('source_digest') in elsewhere for c in cases)} of {len(cases)} "
                       f"case(s) were found by other code (source digest {', '.join(elsewhere)}; here {here}): a "
                       "failure that does not replay here may be that code's", err=True)
        t0 = time.perf_counter()
        bad = engine.replay(cases, exec_timeout)
        res = {"replayed": len(cases), "failed": len(bad), "seconds": round(time.perf_counter() - t0, 2),
               "failures": [{"kind": o.failure, "detail": o.detail} for _, o in bad[:20]]}
        click.echo(json.dumps(res) if as_json else
                   f"replayed {len(cases)} case(s) from {replay}: {len(bad)} failed" +
                   "".join(f"\n  {o.failure}: {o.detail}" for _, o in bad[:20]))
        sys.exit(1 if bad else 0)

    if not quiet:
        click.echo(f"balloon-lab fuzz: {execs:,} execs of {family}, seed {seed}", err=True)
    res = engine.run_fuzz(execs, seed=seed, workers=workers, exec_timeout_s=exec_timeout,
                        keep_corpus=save_corpus is not None, progress=_progress(execs, quiet), family=family)
    failed = res.crashes + res.hangs + res.oob_discards + res.slow_wakeups
    report = res.to_json()
    report["target"] = family
    report["command"] = (f"balloon-lab fuzz --execs {execs} --seed {seed} --target {family}"
                         + (f" --workers {res.workers}" if workers else "") + " --json")
    report["source_digest"] = here
    after = provenance.source_digest()
    if after != here:
        report["source_digest_at_end"] = after
        click.echo(f"balloon-lab fuzz: the fuzzed sources changed while this run ran (source digest {here} at the "
                   f"start, {after} at the end): its cases may not replay; run from a checkout nobody edits "
                   "(a git worktree of the commit)", err=True)
    if res.failures:
        d = out or out_dir() / "fuzz"
        path = _write_cases(d, f"failures-{family}-seed{seed}.jsonl",
                            [dict(f["case"], failure=f["kind"], detail=f["detail"], source_digest=here)
                             for f in res.failures])
        report["failures_file"] = str(path)
    report["failures"] = [{"kind": f["kind"], "detail": f["detail"]} for f in res.failures[:20]]
    if save_corpus is not None:
        report["corpus_file"] = str(_write_cases(save_corpus, f"corpus-{family}-seed{seed}.jsonl"
                                                 if family != "rings" else f"corpus-seed{seed}.jsonl",
                                                 corpus.select_corpus(res.corpus, corpus_max)))
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(f"execs {res.execs:,} in {res.seconds:.1f} s ({report['execs_per_s']:,.0f}/s, {res.workers} workers)\n"
                   f"crashes {res.crashes}  hangs {res.hangs}  oob_discards {res.oob_discards}  "
                   f"slow wake-ups (over 50 ms of CPU) {res.slow_wakeups}\n"
                   f"by target: {res.by_target}\n"
                   f"behaviours seen: {res.signatures}  slowest exec: {res.max_exec_ms:.1f} ms")
        for what, (n, ms) in sorted(res.slow_by_what.items(), key=lambda kv: -kv[1][0]):
            click.echo(f"  slow wake-ups serving {what}: {n}, worst {ms:.1f} ms")
        for f in report["failures"]:
            click.echo(f"  {f['kind']}: {f['detail']}")
        if "failures_file" in report:
            click.echo(f"failing cases: {report['failures_file']} (replay with --replay)")
    sys.exit(1 if failed else 0)
