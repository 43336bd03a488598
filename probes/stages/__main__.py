"""`python -m probes.stages -p PID [-d SECONDS] [--json]`: the stages probe alone on one process.

The probe as a BCC-style tool: attach to PID, count for SECONDS (or until it exits),
print the reading (one JSON object with --json); probes/standalone.py attaches and
prints for every probe. This file is the program, the package's __init__.py the
loader: `python -m` runs this file, so the loader, which probes/session.py imports,
never has to import the tool machinery back.
"""
from probes.standalone import main

raise SystemExit(main(["stages"]))
