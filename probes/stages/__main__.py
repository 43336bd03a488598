"""`python -m probes.stages -p PID [-d SECONDS] [--json]`: the stages probe alone on one
process, a program of its own (probes/standalone.py says why)."""
from probes.standalone import main

raise SystemExit(main(["stages"]))
