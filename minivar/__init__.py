"""minivar: a compact, readable Infinity (next-scale bitwise VAR) with FastVAR's token pruning.

    import minivar
    image = minivar.sample("a red fox in snow", res=1024, prune=True)

Reading order (README, "Reading the code"), the path a call takes: pipeline.py (sample, generate) ->
model/t5.py -> model/sampling.py (the plan and the scale loop) -> model/transformer.py ->
model/pruning.py -> model/vae.py -> model/config.py; parity.py is applied at load time.
"""
from .model.config import InfinityConfig, scale_schedule
from .pipeline import Output, Pipeline, load, sample
from .model.pruning import PruneSchedule
from .model.sampling import Trace

__version__ = "0.1.0"
__all__ = ["InfinityConfig", "Output", "Pipeline", "PruneSchedule", "Trace", "load", "sample", "scale_schedule"]
