"""One training stage per process: zigzag ring attention in HF Llama under DeepSpeed ZeRO."""
