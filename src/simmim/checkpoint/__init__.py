"""Checkpoint files: safe loading, atomic saving, format conversion, position-table resampling, and the
training runs' own checkpoints (full or sharded) that they save and resume from."""
