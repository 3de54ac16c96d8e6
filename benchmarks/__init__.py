"""amountd's benchmarks: `python -m benchmarks [--quick] [NAME ...]` (see run.py)."""
