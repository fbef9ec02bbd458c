"""HART (mit-han-lab/hart), FastVAR's second backbone: step 1, the discrete path.

Beside Infinity, not inside it: ../model/ never imports this package. It reuses the KV cache and the
pruning runner of ../model/ and the checkpoint reading of ../loading/.

    config.py        HartConfig (transformer), VQConfig (tokenizer), the 1024 schedule, presets
    sampling.py      the scale loop: text prefix, CFG growing with the scale, top-k, f_hat; FastVAR's preset
    transformer.py   Llama-style blocks, 1D RoPE for the text and HART's 2D RoPE for image tokens
    vq.py            codebook, Phi, the CNN decoder
    loading.py       a checkpoint folder (llm/, tokenizer/) -> the two models
"""
from .loading import load_hart
from .sampling import HartTrace, fastvar_hart, generate

__all__ = ["load_hart", "generate", "fastvar_hart", "HartTrace"]
