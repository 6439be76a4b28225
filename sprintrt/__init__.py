"""sprintrt: a deployment compiler for SANA-Sprint (export → engines → runtime → benchmarks)."""

__version__ = "0.1.0"
