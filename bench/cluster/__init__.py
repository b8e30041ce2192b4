"""The paper's experiment on an emulated cluster: `python -m bench.cluster` (as root)."""
