"""`balloon-lab ab`: two revisions of the lab gated in one job, interleaved, on paired ratios.

    sides.py                  The two sides: a git revision in a temporary worktree, or another checkout.
    rounds.py                 The interleaved rounds: paced cycles in turn, or whole trials back to back.
    paired.py                 The decision of one metric on per-round ratios: signed-rank p, effect, MDE.
    verdict.py                Every check of every arm (trials, exact counters, timings); verdict, exit code.
    session.py                One comparison from start to verdict: more rounds while unclear, bounded.
    output.py                 The answer as text and as a markdown step summary.
"""
