"""Trials handed to workers on many hosts through procrastinate, a PostgreSQL task queue.

`submit` records a run (status running, owned by no process) in a PostgreSQL results
store and enqueues one job per trial: for every host its own queue, its trials in the
order the local loop would run them (warm-up rounds first, arms interleaved A B A B),
all with the host's id as procrastinate's `lock`, so the jobs of one host run one at a
time and in order even if two workers claim the same host id. A worker
(`balloon-lab worker --host-id ID`) listens to its host's queue, runs each trial in
process, and stores it in one transaction with the host's identity.

Failures and lost workers:
- a trial that fails is recorded in `attempts` and retried by procrastinate, at most
  max_attempts times in all; the last failure is stored as the failed trial.
- a worker killed mid-trial (kill -9, a host lost) stops its heartbeat. Every worker
  looks for jobs whose worker's heartbeat is older than the stall timeout, records the
  loss in `attempts` and puts the job back in its queue; the next worker of that host
  runs the trial again. The store never holds half a trial (one transaction), and a
  trial already stored is never stored twice (a re-run job that finds its trial skips).
- the worker that stores a run's last trial finishes the run.

Why procrastinate: it is a maintained PostgreSQL-only queue (no broker besides the
database the results already live in), with per-queue workers, locks that serialise
jobs, retry strategies, worker heartbeats with stalled-job detection, and an event
table that keeps every job's history, which is what a lab that must not run two
trials at once on a host, and must account for every retry, needs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import procrastinate

from lab.machine import environment
from lab.machine import identity as host
from lab.trials.spec import ArmPlan, ExperimentSpec
from lab.store.store import Store, StoreError, TrialRecord, now_iso

TASK_NAME = "balloon_lab.trial"
QUEUE_PREFIX = "balloon-lab:"
DEFAULT_MAX_ATTEMPTS = 3
HEARTBEAT_S = 5.0
STALL_TIMEOUT_S = 30.0
_RETRY_CEILING = 1000  # procrastinate's own limit; the run's max attempts is what bounds retries
_SCHEMA_LOCK = 0x70726F63  # advisory lock id serialising the queue's schema set-up ("proc")
log = logging.getLogger("balloon_lab.queue")


class QueueError(Exception):
    """Submission or worker set-up that cannot go ahead; the message says why."""


class _RetryTrial(Exception):
    """Raised from the job when a trial failed and has attempts left: procrastinate
    retries exactly this exception."""


def queue_name(host_id: str) -> str:
    return QUEUE_PREFIX + host_id


# --- the procrastinate app ---------------------------------------------------------------
def make_app(url: str) -> procrastinate.App:
    """The app with its one task. procrastinate retries a job whenever it raises
    _RetryTrial; the bound (the run's max attempts) is the job's own decision, so it is
    the submitted run's and not a worker's setting."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    app.task(name=TASK_NAME, pass_context=True,
             retry=procrastinate.RetryStrategy(max_attempts=_RETRY_CEILING, retry_exceptions={_RetryTrial})
             )(_trial_job)
    return app


def ensure_queue_schema(url: str) -> None:
    """Install procrastinate's tables in the database once (concurrent callers wait)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        if conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0] is None:
            conn.execute(procrastinate.schema.SchemaManager.get_schema())


# --- submit -------------------------------------------------------------------------
@dataclass
class Submission:
    run_id: str
    hosts: list[str]
    jobs: int


def submit(url: str, spec: ExperimentSpec, hosts: list[str], *,
           max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Submission:
    """Record a queued run of `spec` for `hosts` and enqueue its trials."""
    if not hosts:
        raise QueueError("--hosts names no host")
    hosts = [host.check_host_id(h) for h in hosts]
    if len(set(hosts)) != len(hosts):
        raise QueueError(f"a host is listed twice in {','.join(hosts)}")
    if max_attempts < 1:
        raise QueueError("max attempts must be at least 1")
    plans = spec.schedule()
    rounds = spec.warmups + spec.trials
    spec_d = spec.to_dict()
    spec_d.update(_arm_labels=[p.label for p in plans], _hosts=hosts, _max_attempts=max_attempts)
    ensure_queue_schema(url)
    with Store(url) as store:
        run_id = store.create_run(spec_d, spec.kind, environment.collect(), queued=True,
                                  command_line=spec.command_line(),
                                  notes=f"queued for hosts {', '.join(hosts)} (procrastinate, at most "
                                        f"{max_attempts} attempt(s) per trial)")
    app = make_app(url)
    task = app.tasks[TASK_NAME]
    jobs = 0
    with app.open():
        for h_i, host_id in enumerate(hosts):
            deferrer = task.configure(queue=queue_name(host_id), lock=host_id)
            for rnd in range(rounds):
                for p_i, plan in enumerate(plans):
                    idx = (h_i * rounds + rnd) * len(plans) + p_i
                    deferrer.defer(run_id=run_id, idx=idx, round=rnd, label=plan.label, host_id=host_id,
                                   warmup=rnd < spec.warmups)
                    jobs += 1
    return Submission(run_id, hosts, jobs)


def expected_trials(spec_d: dict[str, Any]) -> int:
    """How many trials a queued run holds when complete."""
    return len(spec_d.get("_hosts") or [1]) * len(spec_d["_arm_labels"]) * (spec_d["warmups"] + spec_d["trials"])


def run_spec(spec_d: dict[str, Any]) -> ExperimentSpec:
    """The ExperimentSpec stored with a run (private `_` keys dropped)."""
    return ExperimentSpec.from_dict({k: v for k, v in spec_d.items() if not k.startswith("_")})


# --- the job ------------------------------------------------------------------------
@dataclass
class WorkerState:
    """What a worker's jobs share: its host, its own store connection, its probes."""

    url: str
    host_id: str
    name: str
    trial_fn: Callable[[ExperimentSpec, str, int, Any], Any] | None = None
    probe_session: Any = None
    probe_extras: list[str] = field(default_factory=list)   # the session's opt-in probes
    store: Store | None = None
    ran: list[tuple[str, int, str]] = field(default_factory=list)  # (run, idx, status) stored by this worker


def default_trial_fn(spec: ExperimentSpec, arm: str, rnd: int, probe_session: Any) -> Any:
    if spec.kind == "migrate":
        from lab.trials.model.migrate_runner import run_trial as migrate_trial
        return migrate_trial(spec, arm, rnd, probe_session)
    from lab.trials.arm_trial import run_trial
    return run_trial(spec, arm, probe_session)


def _trial_job(context: Any, *, run_id: str, idx: int, round: int, label: str, host_id: str,
               warmup: bool) -> str:
    """One trial of a queued run, on this worker's host."""
    from lab.trials.experiment import _one_trial

    st: WorkerState = context.additional_context["balloon_lab"]
    store = st.store
    attempt = context.job.attempts + 1
    if store.trial_exists(run_id, idx):
        return "already stored"
    run = store.get_run(run_id)
    max_attempts = int(run.spec.get("_max_attempts") or DEFAULT_MAX_ATTEMPTS)
    spec = run_spec(run.spec)
    plan = next((p for p in spec.schedule() if p.label == label), None)
    if plan is None:
        raise QueueError(f"run {run_id} has no arm {label!r}")
    if plan.probes != spec.probes:
        spec = dataclasses.replace(spec, probes=False, probe_overhead=False)
    session = _probes(st, spec)
    rec = _one_trial(spec, plan, lambda s, arm, r: st.trial_fn(s, arm, r, session), round, idx, warmup)
    if rec.status == "failed" and attempt < max_attempts:
        store.record_attempt(run_id, idx, host_id, attempt, st.name, "failed", rec.error)
        raise _RetryTrial(f"trial {idx} of run {run_id} failed (attempt {attempt} of {max_attempts})")
    if rec.status == "failed" and attempt > 1:
        rec.error = f"failed in all {attempt} attempts; the last: {rec.error}"
    rec.host_id, rec.host = host_id, host.identity(host_id).to_dict()
    if not store.add_trial_once(run_id, rec):
        return "already stored"
    st.ran.append((run_id, idx, rec.status))
    backend = ((rec.result or {}).get("probes") or {}).get("backend") if rec.status == "ok" else None
    if backend and backend != run.probe_backend:
        store.set_probe_backend(run_id, backend)
    print(f"worker {st.name}: run {run_id} trial {idx} ({label}, round {round}{', warm-up' if warmup else ''}) "
          f"{rec.status} in {rec.duration_s:.2f} s" + (f" after {attempt} attempts" if attempt > 1 else ""),
          file=sys.stderr, flush=True)
    if finish_if_done(store, run_id):
        print(f"worker {st.name}: run {run_id} finished", file=sys.stderr, flush=True)
    return rec.status


def _probes(st: WorkerState, spec: ExperimentSpec) -> Any:
    """The worker's probe session, opened on the first trial that wants probes (again when
    a run asks for other opt-in probes)."""
    from lab.trials.probing import open_probes
    if spec.probes and st.probe_session is not None and st.probe_extras != spec.extra_probes:
        st.probe_session.detach()                # another run's opt-in probes: a session of its own
        st.probe_session = None
    if spec.probes and st.probe_session is None:
        st.probe_session = open_probes(True, spec.extra_probes)
        st.probe_extras = list(spec.extra_probes)
    return st.probe_session if spec.probes else None


def finish_if_done(store: Store, run_id: str) -> bool:
    """Mark a queued run complete (or failed: no measured trial succeeded) once every
    trial is stored, and store its comparison if one host ran it all."""
    run = store.get_run(run_id)
    if run.status != "running" or store.trial_count(run_id) < expected_trials(run.spec):
        return False
    store.finish_run(run_id, "complete" if run.trials_ok else "failed")
    if len(run.hosts) <= 1:
        from lab.trials.experiment import analyse_run
        analyse_run(store, run_id)
    return True


# --- recovery of lost workers ------------------------------------------------------------
async def recover_stalled(app: procrastinate.App, store: Store, stall_timeout_s: float, who: str) -> list[int]:
    """Put back the jobs of workers whose heartbeat is older than stall_timeout_s, with
    the loss recorded; returns their job ids. A job out of attempts is stored as a failed
    trial (the re-queued job then finds it stored and ends)."""
    recovered = []
    for job in await app.job_manager.get_stalled_jobs(task_name=TASK_NAME, seconds_since_heartbeat=stall_timeout_s):
        kw = job.task_kwargs
        attempt = job.attempts + 1
        err = (f"worker lost mid-trial (no heartbeat for {stall_timeout_s:g} s; job {job.id} attempt {attempt}); "
               f"re-queued by {who}")
        try:
            store.record_attempt(kw["run_id"], kw["idx"], kw["host_id"], attempt, None, "lost", err)
            max_attempts = int(store.get_run(kw["run_id"]).spec.get("_max_attempts") or DEFAULT_MAX_ATTEMPTS)
            if attempt >= max_attempts and not store.trial_exists(kw["run_id"], kw["idx"]):
                store.add_trial_once(kw["run_id"], TrialRecord(
                    arm=kw["label"], idx=kw["idx"], round=kw["round"], warmup=kw["warmup"], status="failed",
                    started_at=now_iso(), duration_s=0.0, host_id=kw["host_id"],
                    error=f"lost in all {attempt} attempts; the last: {err}"))
                finish_if_done(store, kw["run_id"])
            await app.job_manager.retry_job(job)
        except Exception as e:  # another worker recovered it first, or the run is gone
            log.info("job %s not recovered here: %s", job.id, e)
            continue
        recovered.append(job.id)
        print(f"worker {who}: re-queued job {job.id} (run {kw['run_id']} trial {kw['idx']} on {kw['host_id']}): "
              "its worker was lost mid-trial", file=sys.stderr, flush=True)
    return recovered


# --- the worker ---------------------------------------------------------------------------
async def _pending(app: procrastinate.App, queue: str) -> int:
    """Jobs of this queue not finished yet (waiting or running anywhere)."""
    rows = await app.connector.execute_query_all_async(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE queue_name = %(q)s AND status IN ('todo', 'doing')",
        q=queue)
    return int(rows[0]["n"])


async def _serve(st: WorkerState, until_done: bool, heartbeat_s: float, stall_timeout_s: float) -> None:
    app = make_app(st.url)
    async with app.open_async():
        worker = asyncio.create_task(app.run_worker_async(
            queues=[queue_name(st.host_id)], name=st.name, concurrency=1, wait=True,
            update_heartbeat_interval=heartbeat_s, stalled_worker_timeout=stall_timeout_s,
            fetch_job_polling_interval=1.0, additional_context={"balloon_lab": st}, delete_jobs="never",
            install_signal_handlers=True))
        with Store(st.url) as recovery_store:
            while not worker.done():
                await recover_stalled(app, recovery_store, stall_timeout_s, st.name)
                if until_done and await _pending(app, queue_name(st.host_id)) == 0:
                    worker.cancel()
                    break
                await asyncio.wait({worker}, timeout=max(0.5, min(heartbeat_s, 2.0)))
        try:
            await worker
        except asyncio.CancelledError:
            pass


def run_worker(url: str, host_id: str | None = None, *, until_done: bool = False, heartbeat_s: float = HEARTBEAT_S,
               stall_timeout_s: float = STALL_TIMEOUT_S, trial_fn: Callable[..., Any] | None = None) -> WorkerState:
    """Serve host `host_id`'s queue until stopped (SIGINT/SIGTERM: the running trial is
    finished first) or, with until_done, until the queue is empty."""
    if stall_timeout_s <= 2 * heartbeat_s:
        raise QueueError(f"stall timeout {stall_timeout_s:g} s must exceed twice the heartbeat {heartbeat_s:g} s, "
                         "or live workers would be taken for lost ones")
    hid = host.check_host_id(host_id) if host_id else host.host_id()
    ensure_queue_schema(url)
    st = WorkerState(url=url, host_id=hid, name=f"{hid}@{socket.gethostname()}:{os.getpid()}",
                     trial_fn=trial_fn or default_trial_fn)
    st.store = Store(url)
    try:
        asyncio.run(_serve(st, until_done, heartbeat_s, stall_timeout_s))
    finally:
        st.store.close()
        if st.probe_session is not None:
            st.probe_session.detach()
    return st
