"""HTML reports of stored runs: reports.html.write_report(data, path), where data is the run's ReportData
that the lab loads and hands in (lab/cli/report_data.py); the report imports nothing of the lab
(see docs/REPORT.md)."""
