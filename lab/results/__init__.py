"""What one trial result holds: the typed, versioned result and every metric's kind, unit and doc.

    metric_catalog.py         Every metric a stored trial result may hold, by its dotted name, from the declarations.
    metrics.py                Turn a trial's result object into named metrics, and say how each is compared.
    ring_cost.py              The lab's own cost of each arm, against the ring's floor measured with the trial.
    trial_result.py           The result of one balloon trial (lab/trials/model/runner.py), typed and versioned.
"""
