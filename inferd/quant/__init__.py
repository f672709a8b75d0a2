"""Weight-only quantization: int8 per-channel and int4 group-wise layers, GGUF block repacking."""
