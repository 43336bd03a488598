"""One module per `balloon-lab` command, each defining one click command (or group) named `command`.

    bench.py                  `balloon-lab bench`: the lab's speed and memory targets, measured side by side in one run.
    compare.py                `balloon-lab compare`: interleaved trials of several protocols, stored and compared.
    db.py                     `balloon-lab db`: the results store itself: push runs from one store to another.
    doctor.py                 `balloon-lab doctor [--json]`: check that the eBPF lab is fully usable here.
    export.py                 `balloon-lab export RUN... [--format csv|jsonl|parquet] [-o FILE]`: stored runs as
    fuzz.py                   `balloon-lab fuzz`: hostile ring contents against the real device code, with the memfd as oracle.
    gate.py                   `balloon-lab gate`: pass/fail a candidate run against a baseline, for CI.
    history.py                `balloon-lab history METRIC [--arm A] [--run RUN]`: one metric across the stored runs
    migrate.py                `balloon-lab migrate`: live migration with and without free-page hints, stored and compared.
    probe.py                  `balloon-lab probe --pid PID [INTERVAL [COUNT]]`: the lab's probes on any process
    reclaim.py                `balloon-lab reclaim`: how fast each design hands a guest's freed memory back to the host.
    report.py                 `balloon-lab report RUN -o FILE.html`: one self-contained HTML report of a run.
    run.py                    `balloon-lab run`: one trial of one protocol, printed as text or one JSON object.
    runs.py                   `balloon-lab runs`: list the runs in the results database.
    show.py                   `balloon-lab show RUN`: one run's spec, environment, trials and statistics.
    submit.py                 `balloon-lab submit SPEC.toml --hosts a,b`: queue an experiment's trials for workers.
    worker.py                 `balloon-lab worker`: run queued trials for one host, one at a time.
"""
