"""A model with the exact shapes and tokenizer of a real one but random weights, as an HF directory: for speed
measurements where the real weights cannot travel (the GPU machine takes at most 64 MiB; speed does not
depend on the weights' values).

    python benchmarks/random_model.py OUT --skeleton-from smollm2-135m   # config + tokenizer only (small)
    python benchmarks/random_model.py OUT                                # add random bf16 weights
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_skeleton(spec: str, out: Path) -> None:
    from inferd.loader import hub
    from inferd.loader.gguf import config_from_gguf, read_gguf
    from inferd.loader.tokenizer import Tokenizer

    f = read_gguf(hub.resolve(spec))
    cfg = config_from_gguf(f)
    tok = Tokenizer.from_gguf_metadata(f.metadata)
    out.mkdir(parents=True, exist_ok=True)
    tok.hf.save(str(out / "tokenizer.json"))
    eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template,
        "eos_token": tok.hf.id_to_token(eos) if eos is not None else None,
    }))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids), "torch_dtype": "bfloat16",
    }, indent=1))


def write_weights(out: Path, seed: int = 0) -> None:
    c = json.loads((out / "config.json").read_text())
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()

    t = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": torch.ones(h).bfloat16()}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = w(c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t |= {f"{p}.self_attn.q_proj.weight": w(q, h), f"{p}.self_attn.k_proj.weight": w(kv, h),
              f"{p}.self_attn.v_proj.weight": w(kv, h), f"{p}.self_attn.o_proj.weight": w(h, q),
              f"{p}.mlp.gate_proj.weight": w(inter, h), f"{p}.mlp.up_proj.weight": w(inter, h),
              f"{p}.mlp.down_proj.weight": w(h, inter),
              f"{p}.input_layernorm.weight": torch.ones(h).bfloat16(),
              f"{p}.post_attention_layernorm.weight": torch.ones(h).bfloat16()}
    save_file(t, str(out / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--skeleton-from", default=None, help="catalogue name or GGUF path to copy shapes/tokenizer from")
    args = ap.parse_args()
    if args.skeleton_from:
        write_skeleton(args.skeleton_from, args.out)
    else:
        write_weights(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
