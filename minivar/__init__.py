"""minivar: a compact, readable Infinity (next-scale bitwise VAR) with FastVAR's token pruning.

    import minivar
    image = minivar.sample("a red fox in snow", res=1024, prune=True)

Reading order: config -> transformer -> bsq/vae -> t5/tokenizer -> sampling (the scale loop) ->
pruning/presets -> pipeline -> hub.
"""
import os

# Reproducibility across CPUs: ATen picks vectorised kernels per instruction set, and AVX-512 and
# AVX2 kernels round differently (different reduction widths and transcendental approximations).
# Upstream's reference numbers were recorded with AVX2 kernels, so minivar asks for them unless the
# user chose otherwise. This must happen before torch runs its first kernel; matmuls are unaffected.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

from .config import InfinityConfig, scale_schedule  # noqa: E402
from .pipeline import Output, Pipeline, load, sample  # noqa: E402
from .pruning import PruneSchedule  # noqa: E402
from .sampling import Trace  # noqa: E402

__version__ = "0.1.0"
__all__ = ["InfinityConfig", "Output", "Pipeline", "PruneSchedule", "Trace", "load", "sample", "scale_schedule"]
