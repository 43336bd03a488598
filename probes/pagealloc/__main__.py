"""`python -m probes.pagealloc -p PID [-d SECONDS] [--json]`: the pagealloc probe alone on one
process, a program of its own (probes/standalone.py says why)."""
from probes.standalone import main

raise SystemExit(main(["pagealloc"]))
