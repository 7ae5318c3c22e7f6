"""Analyses: metric SQL, read-only SQL, the report, the viewer-format exchange."""
