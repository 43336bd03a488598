"""HTML reports of stored runs: reports.html.write_report(store, run, path) (see docs/REPORT.md)."""
