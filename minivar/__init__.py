"""minivar: a compact, readable Infinity (next-scale bitwise VAR) with FastVAR's token pruning."""
__version__ = "0.1.0"
