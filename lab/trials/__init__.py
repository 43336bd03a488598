"""Trials and experiments of them, on either backend: the spec, the experiment loop, twin trials, the lab's model (model/) and the real stack (qemu/) side by side.

    arm_trial.py              One trial of an arm under an ExperimentSpec, on the arm's backend.
    backends.py               Backends an arm can run on: the lab's own VMM + guest model, or real QEMU + Linux.
    experiment.py             The experiment loop: run a spec's arms interleaved, trial by trial, into the store.
    interrupts.py             Ctrl-C and SIGTERM end every command the same way: unwound, cleaned up, one line.
    monitor_client.py         Clients for the VMM monitor (QMP wire format) and the guest agent (JSON lines).
    orphans.py                Trial processes die with the process that started them, are reaped when done, and
                              leave no scratch directory behind.
    probing.py                How a trial uses the probes: the session opened, the result's `probes` field.
    spec.py                   Experiment specs: what to run, from CLI flags or a TOML file.
    twins.py                  Twin trials: timings the probes do not bias, counts the probes do see.
    model/                    (its own __init__.py)
    qemu/                     (its own __init__.py)
"""
