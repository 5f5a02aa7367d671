"""Autotuning CLI (issue 6)."""
