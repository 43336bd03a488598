"""`python -m probes.kicks -p PID [-d SECONDS] [--json]`: the kicks probe alone on one
process, a program of its own (probes/standalone.py says why)."""
from probes.standalone import main

raise SystemExit(main(["kicks"]))
