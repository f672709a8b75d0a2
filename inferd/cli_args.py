"""Command-line flags of the commands that build an engine (serve, generate, chat, bench offline, eval), and
the one function that turns them into an `EngineConfig`.

Every engine flag is declared in `add_engine_args` with its default read from the config dataclasses, and
read back in `engine_config`: a new engine setting is one flag there and one field here."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from inferd.config import (
    MEMORY_PROFILES,
    SPECULATIVE_METHODS,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
)

if TYPE_CHECKING:
    from inferd.llm import LLM
    from inferd.sampling_params import SamplingParams


def add_engine_args(p: argparse.ArgumentParser, default_model: str | None = EngineConfig.model,
                    repeatable_model: bool = False) -> None:
    """Engine flags. `repeatable_model`: `--model` may be given several times (serve), collected in a list
    (None when absent)."""
    e, s, c = EngineConfig(), SchedulerConfig(), CacheConfig()
    if repeatable_model:
        p.add_argument("--model", "-m", action="append", default=None,
                       help="model to serve (repeatable; default: smollm2-135m and all-minilm-l6-v2): a known name, "
                            "a .gguf file or a Hugging Face directory")
    else:
        p.add_argument("--model", "-m", default=default_model,
                       help="known model name (see `inferd models`), a .gguf file or a Hugging Face directory")
    p.add_argument("--dtype", default=e.dtype, choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bf16 where the CPU/GPU supports it, else fp32)")
    p.add_argument("--device", default=e.device, help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens,
                   help="tokens computed per engine step (prefill chunk size)")
    p.add_argument("--max-model-len", type=int, default=s.max_model_len,
                   help="context length (default: the model's, ≤ 8192)")
    p.add_argument("--kv-cache-memory", type=float, default=c.kv_cache_memory_gib,
                   help="GiB for the paged KV cache (default: a quarter of free memory, at most 2 GiB)")
    p.add_argument("--block-size", type=int, default=c.block_size, help="tokens per KV cache block")
    p.add_argument("--no-prefix-caching", action="store_true", default=not c.enable_prefix_caching,
                   help="disable prefix caching")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quantization", "-q", default=e.quantization, choices=["auto", "none", "int8", "int4", "gguf"],
                   help="quantized weights: int8 (scales per 32), int4 group-wise, or gguf (keep the file's "
                        "Q4_0/Q4_1 blocks packed; Q8_0 as int8); on AVX512-VNNI CPUs activations are int8 too. "
                        "auto: gguf (bf16 copies for big steps as --memory-profile says) for a packable GGUF on such a CPU, else none")
    p.add_argument("--group-size", type=int, default=e.group_size, help="int4 group size (32, 64, 128)")
    p.add_argument("--quant-dense-rows", type=int, default=e.quant_dense_rows,
                   help="also keep bf16 copies of quantized weights and use them for steps of at least this many "
                        "rows (large batches run faster on bf16 GEMM; costs the bf16 memory). 0: packed only")
    p.add_argument("--memory-profile", default=e.memory_profile, choices=list(MEMORY_PROFILES),
                   help="memory/speed trade-off: small (no bf16 copies, KV ≤ 0.5 GiB), balanced (bf16 copies "
                        "for big steps on CPUs with AMX only, KV ≤ 2 GiB), fast (bf16 copies prepacked wherever bf16 "
                        "is native, KV up to half of free memory ≤ 4 GiB)")
    p.add_argument("--enforce-eager", action="store_true", default=e.enforce_eager,
                   help="CUDA: run every step eagerly instead of replaying decode steps from CUDA graphs")
    sp = SpeculativeConfig()
    p.add_argument("--speculative", default=sp.method, choices=list(SPECULATIVE_METHODS),
                   help="speculative decoding: ngram = prompt lookup (propose the tokens that followed the latest "
                        "earlier occurrence of the last n tokens); draft = a smaller model (--draft-model) proposes. "
                        "Proposals are verified in the next step; output unchanged")
    p.add_argument("--num-speculative-tokens", type=int, default=sp.num_speculative_tokens,
                   help="the most tokens proposed per sequence and step (fewer, or none, when the measured "
                        "acceptance rate and step times say verifying them would not pay)")
    p.add_argument("--ngram-min", type=int, default=sp.ngram_min, help="shortest n-gram matched (ngram)")
    p.add_argument("--ngram-max", type=int, default=sp.ngram_max, help="longest n-gram matched (ngram)")
    p.add_argument("--draft-model", default=sp.draft_model,
                   help="speculative draft: the proposing model (known name, .gguf or directory) with the target's "
                        "vocabulary, e.g. a student made by `inferd distill`")


def engine_config(args: argparse.Namespace, model: str | None = None) -> EngineConfig:
    """Parsed engine flags → EngineConfig. `model` overrides `args.model` (serve builds one per --model)."""
    return EngineConfig(
        model=model if model is not None else args.model,
        dtype=args.dtype, device=args.device,
        quantization=args.quantization, group_size=args.group_size, quant_dense_rows=args.quant_dense_rows,
        enforce_eager=args.enforce_eager, memory_profile=args.memory_profile,
        speculative=SpeculativeConfig(args.speculative, args.num_speculative_tokens, args.ngram_min, args.ngram_max,
                                      args.draft_model),
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len),
    )


def set_threads(args: argparse.Namespace) -> None:
    """--threads is process-wide (torch's intra-op pool), so it is applied here, not carried in the config."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def load_llm(args: argparse.Namespace) -> LLM:
    from inferd.llm import LLM

    set_threads(args)
    return LLM(config=engine_config(args))


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    from inferd.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
