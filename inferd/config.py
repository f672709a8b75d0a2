"""Configuration dataclasses: the model zoo normalised into ModelConfig, and engine knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferd.errors import InvalidRequestError, ModelLoadError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # normalised: "llama" | "qwen2" | "mistral"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # rotary dims (defaults to head_dim)
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch_map = {
            "LlamaForCausalLM": "llama",
            "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2",
        }
        arch = next((arch_map[a] for a in archs if a in arch_map), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(sorted(arch_map))}"
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            architecture=arch,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


MEMORY_PROFILES = ("small", "balanced", "fast")


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_gib: float | None = None  # None: a share of free memory
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256
    max_model_len: int | None = None  # None: the model's context length, capped at 8192


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    method: str | None = None  # None: off; "ngram": prompt lookup; "draft": a smaller model proposes
    num_speculative_tokens: int = 4  # the most proposed per sequence and step (the policy may use fewer)
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model: str | None = None  # method "draft": name, .gguf or directory, same vocabulary as the target

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise InvalidRequestError(f"unknown speculative method {self.method!r}; choose one of "
                                      f"{', '.join(SPECULATIVE_METHODS)}", param="speculative")
        if (self.method == "draft") != (self.draft_model is not None):
            raise InvalidRequestError("--draft-model goes with --speculative draft (and only with it)",
                                      param="draft_model")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise InvalidRequestError("num_speculative_tokens must be between 1 and 16",
                                      param="num_speculative_tokens")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidRequestError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and "
                                      f"{self.ngram_max}", param="ngram_min")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto | float32 | bfloat16
    device: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quantization: str = "auto"  # auto | none | int8 | int4 | gguf (auto: see quant.apply.resolve_auto)
    group_size: int = 32  # int4 group size
    quant_dense_rows: int = 0  # >0: keep bf16 copies of quantized weights for steps with at least this many rows
    enforce_eager: bool = False  # CUDA: never replay decode steps from captured CUDA graphs
    # small: no bf16 copies of packed weights, KV ≤ 0.5 GiB, cached prefixes evicted before new KV memory is
    # touched; balanced: bf16 copies for big steps (auto), KV ≤ 2 GiB; fast: as balanced with KV up to ½ of
    # free memory ≤ 4 GiB. Explicit --quant-dense-rows / --kv-cache-memory win over the profile.
    memory_profile: str = "balanced"
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.memory_profile not in MEMORY_PROFILES:
            raise ValueError(f"unknown memory profile {self.memory_profile!r}; choose one of "
                             f"{', '.join(MEMORY_PROFILES)}")
