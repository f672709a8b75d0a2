"""Offline library API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from inferd.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from inferd.engine.llm_engine import LLMEngine, run_to_completion
from inferd.engine.outputs import RequestOutput
from inferd.sampling_params import SamplingParams


class LLM:
    """Defaults come from the config dataclasses, the same ones the CLI reads, so `LLM(m)` and
    `inferd generate --model m` run the same engine."""

    def __init__(self, model: str = EngineConfig.model, *, dtype: str = EngineConfig.dtype,
                 device: str = EngineConfig.device, max_num_seqs: int = SchedulerConfig.max_num_seqs,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
                 max_model_len: int | None = SchedulerConfig.max_model_len,
                 kv_cache_memory: float | None = CacheConfig.kv_cache_memory_gib,
                 enable_prefix_caching: bool = CacheConfig.enable_prefix_caching,
                 block_size: int = CacheConfig.block_size, quantization: str = EngineConfig.quantization,
                 group_size: int = EngineConfig.group_size, quant_dense_rows: int = EngineConfig.quant_dense_rows,
                 enforce_eager: bool = EngineConfig.enforce_eager,
                 memory_profile: str = EngineConfig.memory_profile,
                 speculative: str | SpeculativeConfig | None = None,
                 num_speculative_tokens: int = SpeculativeConfig.num_speculative_tokens,
                 draft_model: str | None = None, config: EngineConfig | None = None):
        if not isinstance(speculative, SpeculativeConfig):
            speculative = SpeculativeConfig(speculative, num_speculative_tokens, draft_model=draft_model)
        self.config = config or EngineConfig(
            model=model, dtype=dtype, device=device, quantization=quantization, group_size=group_size,
            quant_dense_rows=quant_dense_rows, enforce_eager=enforce_eager, memory_profile=memory_profile,
            speculative=speculative,
            cache=CacheConfig(block_size=block_size, kv_cache_memory_gib=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len),
        )
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]
                 | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for p, sp in zip(prompts, plist):
            rid = str(next(self._ids))
            self.engine.add_request(rid, p, sp)
            ids.append(rid)
        bar = tqdm(total=len(ids), disable=not use_tqdm, desc="generate")
        results = run_to_completion(self.engine, on_finished=(lambda _: bar.update(1)) if use_tqdm else None)
        bar.close()
        return [results[i] for i in ids]

    def chat(self, conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [self.tokenizer.encode_chat(list(c)) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm)
