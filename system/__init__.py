"""The machine's OS facilities every room shares: it imports nothing of the project.

    knobs.py                  Kernel knobs a lab process raises for a while, restored on every exit path.
    signals.py                Signals a lab process holds back or is sent: SIGINT/SIGTERM deferred, SIGKILL with its parent.
"""
