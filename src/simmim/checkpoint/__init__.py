"""Checkpoint files: safe loading, atomic saving, format conversion and position-table resampling."""
