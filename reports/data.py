"""What the report's sections share about the data they are handed: the run's record
(ReportData, built by the lab: lab/cli/report_data.py) and a few display constants.
The report imports nothing of the lab: it reads the record it is given."""
from __future__ import annotations

import math
from typing import Any

# lab/cli/report_data.py's ReportData: the run, its samples and comparison, and what the
# sections need of the lab (a metric's kind and unit, the statistics they quote, ...).
ReportData = Any

MiB = 1 << 20
STAGES = ("alloc", "encode", "transmit", "translate", "discard")
OPS = ("inflate", "deflate")


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
