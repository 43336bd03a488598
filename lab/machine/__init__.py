"""The machine the lab runs on: its identity (recorded with every trial) and its state when a run starts.

    environment.py            What the machine looked like when a run started.
    identity.py               Which host ran a trial: its identity, recorded with every trial.
"""
