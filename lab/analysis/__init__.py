"""Statistics over stored trials: comparisons with confidence intervals, per-host views.

    host_views.py             A run's trials grouped by host: who ran them, under what load, and per-host statistics.
    stats.py                  Statistics that turn repeated trials into defensible comparisons (scipy).
"""
