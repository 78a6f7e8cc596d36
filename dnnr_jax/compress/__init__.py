"""Compression: pruning, quantization and their schedules, on params pytrees."""
