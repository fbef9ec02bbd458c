"""`python -m minivar.bench ...`: the benchmark (run.py)."""
from .run import main

main()
