"""Benchmarks: ``python -m bench`` (all) or ``python -m bench seal small appends rss recovery``."""
