"""`python -m probes.pagefree -p PID [-d SECONDS] [--json]`: the page-free probe alone on one
process, a program of its own (probes/standalone.py says why)."""
from probes.standalone import main

raise SystemExit(main(["pagefree"]))
