"""Making machines run trials: the doctor's checks, and the task queue that hands trials to workers on many hosts.

    doctor.py                 `balloon-lab doctor`: is the eBPF lab fully usable here, and if not, the exact fix.
    task_queue.py             Trials handed to workers on many hosts through procrastinate, a PostgreSQL task queue.
"""
