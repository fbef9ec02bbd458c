"""`python -m minivar.flops` still works: the FLOP counter lives in minivar/bench/flops.py."""
import runpy

if __name__ == "__main__":
    runpy.run_module("minivar.bench.flops", run_name="__main__", alter_sys=True)
