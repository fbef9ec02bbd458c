"""Getting weights into the model: the hub and the weights folder (hub.py), reading checkpoint files
safely (weights.py), building each model from its files (checkpoint.py), safetensors conversion
(convert.py) and crash-safe file writes (files.py). Nothing here is part of the algorithm."""
