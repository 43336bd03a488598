"""The CI regression gate: a candidate run against a baseline (a run or a baseline file), per arm and metric, across runs and hosts.

    ab/                       `balloon-lab ab`: two revisions interleaved in one job, gated on paired ratios.
    baseline_file.py          Baseline files: a finished run's per-arm samples in versioned JSON, committed for CI.
    ci_summary.py             Under GitHub Actions: the step summary and ::error annotations of gate and ab.
    compare.py                The CI regression gate: a candidate run against a baseline run, per arm and metric.
    history.py                A metric across the stored runs of one experiment, with the gate's notes.
    hosts.py                  The gate across hosts: timings are compared only within a host, counters anywhere.
    inputs.py                 The gate's two sides: a stored run or a baseline file, read into per-arm samples.
    result.py                 The gate's answer: one Check per arm and metric, the verdict as text, JSON or JUnit.
    same_job.py               Were two runs made in one job? Only then are their timings compared.
    thresholds.py             How much change the gate allows: defaults, per-metric rules and the thresholds file.
"""
