"""Model compression tools: structured pruning (`inferd prune`) and knowledge distillation (`inferd distill`).

Training code lives only here: `forward.py` is a differentiable forward over the inference model classes
(plain causal SDPA, no paged cache), `prune.py` edits config + tensors, `distill.py` trains a student against a
teacher, `io.py` loads models for training and writes HF-style directories the normal loaders read."""
