"""minivar: a compact, readable Infinity (next-scale bitwise VAR) with FastVAR's token pruning.

    import minivar
    image = minivar.sample("a red fox in snow", res=1024, prune=True)

Reading order (README, "Reading the code"): sampling (the scale loop) -> transformer -> pruning/presets
-> bsq/vae -> t5/tokenizer -> pipeline/checks -> config -> numerics.
"""
from .model.config import InfinityConfig, scale_schedule
from .pipeline import Output, Pipeline, load, sample
from .model.pruning import PruneSchedule
from .model.sampling import Trace

__version__ = "0.1.0"
__all__ = ["InfinityConfig", "Output", "Pipeline", "PruneSchedule", "Trace", "load", "sample", "scale_schedule"]
