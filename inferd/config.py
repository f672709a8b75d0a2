"""Configuration dataclasses: the model zoo normalised into ModelConfig, and engine knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferd.errors import InvalidRequestError, ModelLoadError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # normalised: one of models.registry.ARCHITECTURES (llama, mistral, qwen2, qwen3, gemma3)
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
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotation (Qwen3, Gemma 3)
    mlp_act: str = "silu"  # gated MLP activation: "silu" (SwiGLU) | "gelu_tanh" (Gemma)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding-window size, or None (global); () = all global
    rope_local_theta: float | None = None  # rope base of the sliding-window layers when it differs (Gemma 3)
    rope_local_scaling: dict[str, Any] | None = None
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma)

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it attends to the whole context)."""
        return self.layer_windows[layer] if self.layer_windows else None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for scaling in (self.rope_scaling, self.rope_local_scaling):
            kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
            if kind not in ROPE_TYPES:
                raise ModelLoadError(f"unsupported rope scaling {kind!r} (supported: linear, llama3, yarn)")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ModelLoadError(f"{len(self.layer_windows)} sliding-window entries for {self.num_layers} layers")

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        cfg = text_model_config(cfg)
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(sorted(HF_ARCHITECTURES))}"
            )
        try:
            return _from_hf(arch, cfg)
        except KeyError as exc:
            raise ModelLoadError(f"config.json is missing {exc.args[0]!r} (needed for {arch})") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json has an invalid value ({exc})") from None


ROPE_TYPES = (None, "default", "linear", "llama3", "yarn", "freq_factors")  # freq_factors: GGUF rope_freqs

# config.json `architectures` → our architecture name
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}


# multimodal checkpoints whose text model inferd runs (the vision tower and projector are not loaded) → the text
# model's class, the defaults its config class fills in (older config.json files store only what differs) and what
# the multimodal class does differently (transformers' Gemma3ForConditionalGeneration applies no final soft-capping)
MULTIMODAL_TEXT_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", {
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "sliding_window_pattern": 6, "final_logit_softcapping": None,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1},
        {"final_logit_softcapping": None}),
}


def is_multimodal(cfg: dict[str, Any]) -> bool:
    return any(a in MULTIMODAL_TEXT_MODELS for a in cfg.get("architectures") or [])


def text_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A multimodal checkpoint's config.json → the config of its text model, as a text-only config.json would
    have it (defaults filled, the end-of-turn ids of the outer config kept); any other config unchanged."""
    arch = next((a for a in cfg.get("architectures") or [] if a in MULTIMODAL_TEXT_MODELS), None)
    if arch is None:
        return cfg
    text_arch, defaults, overrides = MULTIMODAL_TEXT_MODELS[arch]
    text = {**defaults, **(cfg.get("text_config") or {}), **overrides, "architectures": [text_arch]}
    if "_sliding_window_pattern" in text:
        text.setdefault("sliding_window_pattern", text["_sliding_window_pattern"])
    ids: list[int] = []
    for src in (text, cfg):
        eos = src.get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    text["eos_token_id"] = list(dict.fromkeys(ids))
    if "tie_word_embeddings" in cfg:
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return text


def _rope(cfg: dict[str, Any], layer_type: str | None = None) -> tuple[float, dict[str, Any] | None]:
    """(rope base, scaling dict or None) from either config style: transformers ≥ 5 `rope_parameters` (per layer
    type for Gemma 3) or the older `rope_theta` + `rope_scaling` (+ Gemma's `rope_local_base_freq`)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        kind = scaling.get("rope_type") or scaling.get("type")
        return float(params["rope_theta"]), (scaling if kind not in (None, "default") else None)
    if layer_type == "sliding_attention":
        return float(cfg.get("rope_local_base_freq", 10000.0)), None
    theta = float(cfg.get("rope_theta", 1_000_000.0 if layer_type else 10000.0))
    scaling = cfg.get("rope_scaling")
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    return theta, (scaling if kind not in (None, "default") else None)


def _windows(arch: str, cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if not window:
        return ()
    types = cfg.get("layer_types")
    if types is None:
        if arch == "gemma3":
            pattern = int(cfg.get("sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        elif arch in ("qwen2", "qwen3"):
            first = int(cfg.get("max_window_layers", layers))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        else:  # Mistral: every layer
            types = ["sliding_attention"] * layers
    if len(types) != layers:
        raise ModelLoadError(f"config.json layer_types has {len(types)} entries for {layers} layers")
    out = tuple(int(window) if t == "sliding_attention" else None for t in types)
    return out if any(w is not None for w in out) else ()


def _from_hf(arch: str, cfg: dict[str, Any]) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    gemma = arch == "gemma3"
    theta, scaling = _rope(cfg, "full_attention" if gemma else None)
    local_theta, local_scaling = _rope(cfg, "sliding_attention") if gemma else (None, None)
    head_dim = cfg.get("head_dim") or hidden // heads
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"unsupported activation {act!r} (supported: silu, gelu_pytorch_tanh)")
    return ModelConfig(
        architecture=arch,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6 if gemma else 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        qk_norm=arch in ("qwen3", "gemma3"),
        mlp_act="silu" if act == "silu" else "gelu_tanh",
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
        layer_windows=_windows(arch, cfg, layers),
        rope_local_theta=local_theta,
        rope_local_scaling=local_scaling,
        final_logit_softcap=cfg.get("final_logit_softcapping") if gemma else None,
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
