"""Measurement, kept out of the model: the benchmark (`python -m minivar.bench`, run.py), the analytic
FLOP counter (flops.py, `python -m minivar.bench.flops`), the synthetic full-size checkpoints
(synthetic.py) and the per-scale analyses the notebooks plot (analysis.py)."""
