"""Offline analysis of worker logs and masks (`producer report`): parsing, statistics, plots, report.md."""
