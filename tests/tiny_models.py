"""Tiny random models built in the tests: one Llama written as an HF directory and as a GGUF file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tests import kquant_encoder

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Inference turns a trained model into answers. Café, naïve, 東京, emoji 🙂 are text too.",
    "the quick brown fox jumps over the lazy dog 0123456789 " * 3,
]

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def random_weights(cfg: dict, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def w(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    out = {"model.embed_tokens.weight": w(vocab, h, scale=1.0), "model.norm.weight": 1 + w(h, scale=0.1),
           "lm_head.weight": w(vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out.update({
            f"{p}.input_layernorm.weight": 1 + w(h, scale=0.1),
            f"{p}.post_attention_layernorm.weight": 1 + w(h, scale=0.1),
            f"{p}.self_attn.q_proj.weight": w(h, h), f"{p}.self_attn.k_proj.weight": w(kv, h),
            f"{p}.self_attn.v_proj.weight": w(kv, h), f"{p}.self_attn.o_proj.weight": w(h, h),
            f"{p}.mlp.gate_proj.weight": w(inter, h), f"{p}.mlp.up_proj.weight": w(inter, h),
            f"{p}.mlp.down_proj.weight": w(h, inter),
        })
    return out


def write_hf(dirpath: Path, seed: int = 0, config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    dirpath.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = {**TINY_CONFIG, **(config or {}), "vocab_size": vocab}
    tok.save(str(dirpath / "tokenizer.json"))
    (dirpath / "config.json").write_text(json.dumps(cfg))
    (dirpath / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    weights = random_weights(cfg, vocab, seed)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dirpath / "model.safetensors"))
    return dirpath



def add_tiny_tokenizer(w, hf_dir: Path) -> None:
    """Write the tiny byte-level BPE tokenizer of `hf_dir` (its tokenizer.json) and the chat template into a
    gguf.GGUFWriter, as llama.cpp's converter does for a GPT-2-style vocabulary."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

def write_gguf(path: Path, hf_dir: Path, quant: str | Callable[[str], str | None] | None = None) -> Path:
    """The same model as `hf_dir`, written the way llama.cpp's converter does (Q/K rows permuted); `quant`
    (e.g. "Q4_1") stores the decoder's linear weights in that block format, or names the format per HF tensor
    name (None: float); K-quants come from tests/kquant_encoder.py."""
    import gguf
    from safetensors.torch import load_file

    from inferd.loader.gguf import hf_to_gguf_name, llama_permute

    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    add_tiny_tokenizer(w, hf_dir)
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        arr = t.float().numpy()
        if name.endswith("q_proj.weight"):
            arr = llama_permute(arr, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            arr = llama_permute(arr, cfg["num_key_value_heads"])
        kind = quant(name) if callable(quant) else (
            quant if quant and name.startswith("model.layers.") and name.endswith("proj.weight") else None)
        if kind:
            qt = getattr(gguf.GGMLQuantizationType, kind)
            arr = np.ascontiguousarray(arr)
            raw = kquant_encoder.quantize(arr, kind) if kind.endswith("_K") else gguf.quants.quantize(arr, qt)
            w.add_tensor(hf_to_gguf_name(name), raw, raw_dtype=qt)
            continue
        w.add_tensor(hf_to_gguf_name(name), np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BERT_CONFIG = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "hidden_act": "gelu",
}


def write_bert(dirpath: Path, seed: int = 0, labels: list[str] | None = None, max_seq_length: int = 24) -> Path:
    """A tiny sentence-transformers style BERT (mean pooling + Normalize), or a sequence classifier."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    dirpath.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(CORPUS + ["my invoice is wrong", "the app crashes on start", "hello there"], trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                   ("[SEP]", sep)])
    tok.save(str(dirpath / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    cfg = {**BERT_CONFIG, "vocab_size": vocab}
    if labels:
        cfg["architectures"] = ["BertForSequenceClassification"]
        cfg["id2label"] = {str(i): lb for i, lb in enumerate(labels)}
        cfg["label2id"] = {lb: i for i, lb in enumerate(labels)}
    (dirpath / "config.json").write_text(json.dumps(cfg))
    (dirpath / "tokenizer_config.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]"}))
    if not labels:
        (dirpath / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (dirpath / "1_Pooling").mkdir(exist_ok=True)
        (dirpath / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
        (dirpath / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    g = torch.Generator().manual_seed(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]

    def w(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    pre = "bert." if labels else ""
    t = {f"{pre}embeddings.word_embeddings.weight": w(vocab, h, scale=1.0),
         f"{pre}embeddings.position_embeddings.weight": w(64, h),
         f"{pre}embeddings.token_type_embeddings.weight": w(2, h),
         f"{pre}embeddings.LayerNorm.weight": 1 + w(h, scale=0.1), f"{pre}embeddings.LayerNorm.bias": w(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"{pre}encoder.layer.{i}."
        for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                            ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                            ("intermediate.dense", (inter, h)), ("output.dense", (h, inter))):
            t[p + name + ".weight"] = w(*shape)
            t[p + name + ".bias"] = w(shape[0], scale=0.05)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"] = 1 + w(h, scale=0.1)
            t[p + name + ".bias"] = w(h, scale=0.05)
    t[f"{pre}pooler.dense.weight"], t[f"{pre}pooler.dense.bias"] = w(h, h), w(h)
    if labels:
        t["classifier.weight"], t["classifier.bias"] = w(len(labels), h, scale=1.0), w(len(labels))
    save_file({k: v.contiguous() for k, v in t.items()}, str(dirpath / "model.safetensors"))
    return dirpath
