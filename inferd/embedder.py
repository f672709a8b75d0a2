"""Embedder: BERT-family encoders for embeddings, similarity scoring and classification.

    Embedder("all-minilm-l6-v2").embed(["a text", ...])  → np.ndarray (n, dim)

Reads a sentence-transformers / Hugging Face directory: config.json, *.safetensors, tokenizer.json,
modules.json (Pooling, Normalize), 1_Pooling/config.json, sentence_bert_config.json (max_seq_length).
Texts are sorted by length and packed into batches by a token budget, so almost no compute goes to padding;
an exact-match LRU cache returns repeated texts without recomputation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inferd.errors import InvalidRequestError, ModelLoadError
from inferd.hardware import pick_device, pick_dtype, release_free_memory
from inferd.loader import hub, module_cache
from inferd.loader.materialize import skip_init
from inferd.loader.safetensors import load_safetensors, read_hf_config
from inferd.models import bert as bert_module
from inferd.models.bert import BertConfig, BertEncoder
from inferd.ops.kernels import get_kernels
from inferd.ops.onednn import PackedLinear
from inferd.quant.w8a8 import calibrate_absmax, int8_gemm_exact, swap_linears, weight_qmax

log = logging.getLogger(__name__)
QUANTIZATIONS = ("auto", "none", "int8")
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (0.3 and 0.6 measured worse on MiniLM)
# Input channels per W8A8 linear kept in fp32 (largest calibrated |x|). MiniLM's LayerNorm outputs carry a few
# large-magnitude channels, largest on [CLS]/[SEP]; with one int8 scale per token they set that token's step, so
# a text of few tokens ("" is [CLS][SEP] only) had min cosine 0.9987 to fp32. Measured (fp32 model, 75 texts incl.
# "", one word, non-ASCII; min cosine to the fp32 path): 0 channels 0.9987, 4 0.9994, 8 0.9995, 16 0.9995.
OUTLIER_CHANNELS = 8
_CALIBRATION = Path(__file__).parent / "compress" / "data"


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """`auto` → int8 on CPUs with the C kernels (W8A8 linears: ~2x the bf16 GEMM throughput through oneDNN; the
    quantizer and epilogue are C passes) whose int8 GEMM is exact (VNNI or AMX), none elsewhere (GPU, the `torch`
    tier where they would be torch ops, CPUs without VNNI where the fp32 model runs oneDNN-prepacked linears)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "auto":  # int8 only where the int8 GEMM is exact at full range (VNNI/AMX): elsewhere
        # the fp32 model with oneDNN-prepacked linears is as fast (56 vs 57 GOP/s without VNNI on Zen 4)
        ok = device.type == "cpu" and get_kernels().lib is not None and int8_gemm_exact()
        return "int8" if ok else "none"
    if quantization == "int8" and device.type != "cpu":
        raise ValueError("int8 encoder quantization runs on CPU only; use --quantization none on this device")
    return quantization


def calibration_texts() -> list[str]:
    """Natural English for the activation ranges SmoothQuant needs: the paragraphs of the compressors'
    calibration essay and the sample prompts (62 texts, ~1,600 MiniLM tokens); shipped in the package."""
    paras = [p.strip() for p in (_CALIBRATION / "calibration.txt").read_text().split("\n\n") if p.strip()]
    return paras + [ln.strip() for ln in (_CALIBRATION / "prompts.txt").read_text().splitlines() if ln.strip()]


def _stats_cache_file(path: Path) -> Path:
    """Where the calibrated activation ranges of this model directory are kept: keyed by its weight files (size,
    mtime) and the calibration text, under $INFERD_HOME/calibration."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + [_CALIBRATION / "calibration.txt", _CALIBRATION / "prompts.txt"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    home = Path(os.environ.get("INFERD_HOME", Path.home() / ".cache" / "inferd"))
    return home / "calibration" / f"{path.name}-{h.hexdigest()[:16]}.pt"


def _load_stats(f: Path) -> dict[str, torch.Tensor] | None:
    try:
        return torch.load(f, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None


@torch.inference_mode()
def w8a8_plan(model: BertEncoder, calib: list[list[int]], cache: Path | None = None) -> dict[str, dict]:
    """Which linears become W8A8 and how, from the activation ranges on `calib` (model in fp32).

    Every layer's qkv, attention output and FFN up projection (with its GELU fused); the FFN down projection
    stays in the model dtype: quantizing its GELU outputs per token (or per group of 384) cost the most cosine
    (min 0.9984 with it vs 0.9993 without, 120 bench texts, see docs/benchmarks.md). In each, the OUTLIER_CHANNELS
    input channels with the largest calibrated |x| run in fp32 (in the epilogue), the rest in int8."""
    stats = _load_stats(cache) if cache is not None and cache.is_file() else None
    if stats is None:  # one fp32 pass over ~1,600 tokens; later loads read the cached ranges
        stats = calibrate_absmax(model, lambda: [model(calib[i : i + 16]) for i in range(0, len(calib), 16)])
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                torch.save(stats, tmp)
                os.replace(tmp, cache)  # atomic: a concurrent loader never reads half a file
            except OSError as exc:  # a read-only or full $INFERD_HOME: the cache is an optimisation only
                log.warning("cannot cache the calibration ranges in %s: %s", cache, exc)
    plan = {}
    for i, layer in enumerate(model.layers):
        act = "gelu_tanh" if layer.gelu_tanh else "gelu"
        for name, kw in (("qkv", {}), ("attn_out", {}), ("inter", {"act": act})):
            full = f"layers.{i}.{name}"
            plan[full] = {"act_absmax": stats[full], "alpha": SMOOTH_ALPHA, "outliers": OUTLIER_CHANNELS, **kw}
    return plan


def pack_fp32_linears(model: BertEncoder) -> int:
    """Swap the encoder layers' remaining fp32 nn.Linear for oneDNN-prepacked ones (3.5x MKL's sgemm on the FFN
    down projection on Zen 4, see ops/onednn.py): the fp32 model of CPUs without native bf16 (AVX-512 without
    BF16, AVX2). Returns how many were swapped (0 where oneDNN cannot)."""
    n = 0
    for layer in model.layers:
        for name in ("qkv", "attn_out", "inter", "out"):
            lin = getattr(layer, name)
            if type(lin) is nn.Linear and lin.weight.dtype == torch.float32:
                act = ("gelu_tanh" if layer.gelu_tanh else "gelu") if name == "inter" else None  # GELU fused
                packed = PackedLinear.from_linear(lin, act)
                if packed is not None:
                    setattr(layer, name, packed)
                    n += 1
    return n


@dataclass
class PoolingConfig:
    mode: str = "mean"  # mean | cls | max
    normalize: bool = False
    max_seq_length: int = 512


def _pooling_config(d: Path, max_pos: int) -> PoolingConfig:
    pc = PoolingConfig(max_seq_length=max_pos)
    modules = json.loads((d / "modules.json").read_text()) if (d / "modules.json").is_file() else []
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            cfg_path = d / m.get("path", "1_Pooling") / "config.json"
            if cfg_path.is_file():
                c = json.loads(cfg_path.read_text())
                pc.mode = "cls" if c.get("pooling_mode_cls_token") else "max" if c.get("pooling_mode_max_tokens") \
                    else "mean"
        elif kind.endswith("Normalize"):
            pc.normalize = True
    sb = d / "sentence_bert_config.json"
    if sb.is_file():
        pc.max_seq_length = min(int(json.loads(sb.read_text()).get("max_seq_length", max_pos)), max_pos)
    return pc


class LRUCache:
    """Bounded exact-match cache of embedding vectors; thread-safe; counts hits and misses."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        if self.max_entries <= 0:
            return None
        with self.lock:
            v = self.data.get(key)
            if v is None:
                self.misses += 1
                return None
            self.data.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple, value: np.ndarray) -> None:
        if self.max_entries <= 0:
            return
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.max_entries:
                self.data.popitem(last=False)


class Embedder:
    def __init__(self, model: str = "all-minilm-l6-v2", *, dtype: str = "auto", device: str = "auto",
                 cache_size: int = 10000, max_batch_tokens: int = 8192, quantization: str = "auto"):
        from inferd.loader.tokenizer import Tokenizer

        path = hub.resolve(model)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: an encoder must be a Hugging Face model directory")
        self.name = model if model in hub.CATALOGUE else path.name
        self.path = path
        self.config = BertConfig.from_hf(read_hf_config(path))
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.quantization = resolve_quantization(quantization, self.device)
        tok = Tokenizer.from_hf_dir(path)
        self.tokenizer = tok.hf
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.pooling = _pooling_config(path, self.config.max_position_embeddings)
        key = None
        if module_cache.enabled(self.device):  # the built model (dtype, W8A8 layers) mapped from $INFERD_HOME
            stats = _stats_cache_file(path).name if self.quantization == "int8" else None
            key = module_cache.cache_key(path, {"dtype": str(self.dtype), "quantization": self.quantization,
                                                "calibration": stats, "outlier_channels": OUTLIER_CHANNELS,
                                                "weight_qmax": weight_qmax() if self.quantization == "int8" else None},
                                         (Path(__file__), Path(str(bert_module.__file__))))
        self.model = self._skeleton()
        if key is None or not module_cache.load(self.model, key):
            self.model = self._build(self._skeleton())
            if key is not None and module_cache.save(self.model, key):
                mapped = self._skeleton()  # this process, too, uses the shared mapping, not its private copies
                if module_cache.load(mapped, key):
                    self.model = mapped
        self.model.eval().requires_grad_(False)
        self.packed_linears = 0  # fp32 linears prepacked for oneDNN (not on the `torch` tier: the plain reference)
        if self.dtype == torch.float32 and self.device.type == "cpu" and get_kernels().lib is not None:
            self.packed_linears = pack_fp32_linears(self.model)  # per process: oneDNN's layout is not cached
        release_free_memory()  # the fp32 weights and the quantization temporaries (or the skeleton's)
        self.max_batch_tokens = max_batch_tokens
        self.cache = LRUCache(cache_size)
        self.dim = self.config.hidden_size
        self._lock = threading.Lock()  # one forward at a time (torch uses every core already)

    def _skeleton(self) -> BertEncoder:
        # skip_init, not the meta device: the meta device's first op costs seconds of lazy torch imports
        with skip_init(), (torch.device(self.device) if self.device.type != "cpu" else nullcontext()):
            return BertEncoder(self.config)

    def _build(self, model: BertEncoder) -> BertEncoder:
        """The model from its files: fp32 weights, W8A8 linears calibrated in fp32, the rest in the compute dtype."""
        model.load_weights(load_safetensors(self.path, torch.float32))
        model.eval().requires_grad_(False)
        plan, fp32 = {}, {}
        if self.quantization == "int8":
            plan = w8a8_plan(model, self.tokenize(calibration_texts()), _stats_cache_file(self.path))
            fp32 = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                    for n, m in model.named_modules() if n in plan}
        model = model.to(self.dtype)
        swap_linears(model, plan, fp32)
        return model

    # ---- tokenization ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str], truncate: bool = True) -> list[list[int]]:
        encs = self.tokenizer.encode_batch(texts)
        out = []
        limit = self.pooling.max_seq_length
        for i, e in enumerate(encs):
            ids = e.ids
            if len(ids) > limit:
                if not truncate:
                    raise InvalidRequestError(
                        f"input {i} has {len(ids)} tokens, more than this model's maximum of {limit}; shorten it "
                        "or set truncate_prompt_tokens", param="input")
                ids = ids[: limit - 1] + ids[-1:]  # keep [SEP]
            out.append(ids)
        return out

    # ---- compute ---------------------------------------------------------------------------------
    def _batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices grouped by length (longest first) so that each batch's padded size ≤ max_batch_tokens."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        batches, cur = [], []
        for i in order:
            longest = len(seqs[cur[0]]) if cur else len(seqs[i])
            if cur and longest * (len(cur) + 1) > self.max_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    @torch.inference_mode()
    def _hidden_pooled(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled (B, h) float32 and, for classifiers, logits (B, labels)."""
        with self._lock:
            x, lens = self.model(seqs)
        seg = torch.arange(len(seqs)).repeat_interleave(lens).to(x.device)
        starts = torch.cumsum(lens, 0) - lens
        xf = x.float()
        logits = None
        if self.config.num_labels:
            cls = xf[starts.to(x.device)]
            pooled_cls = torch.tanh(self.model.pooler(cls.to(self.dtype)).float())
            logits = self.model.classifier(pooled_cls.to(self.dtype)).float()
        mode = self.pooling.mode
        if mode == "cls":
            pooled = xf[starts.to(x.device)]
        elif mode == "max":
            pooled = torch.full((len(seqs), xf.shape[1]), float("-inf"), device=x.device)
            pooled = pooled.scatter_reduce(0, seg.unsqueeze(1).expand_as(xf), xf, "amax")
        else:
            pooled = torch.zeros(len(seqs), xf.shape[1], device=x.device).index_add_(0, seg, xf)
            pooled = pooled / lens.to(x.device).unsqueeze(1)
        if self.pooling.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled, logits

    def embed_ids(self, seqs: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        for batch in self._batches(seqs):
            pooled, _ = self._hidden_pooled([seqs[i] for i in batch])
            out[batch] = pooled.cpu().numpy()
        return out

    def lookup(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, list[int]]:
        """Cached vectors filled in a (n, dim) array, and the indices of the texts still to compute."""
        result = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = []
        for i, t in enumerate(texts):
            hit = self.cache.get((self.name, t, truncate))
            if hit is None:
                todo.append(i)
            else:
                result[i] = hit
        return result, todo

    def remember(self, texts: list[str], todo: list[int], vecs: np.ndarray, truncate: bool, out: np.ndarray) -> None:
        """Store freshly computed vectors (row j belongs to texts[todo[j]]) in `out` and in the cache."""
        for j, i in enumerate(todo):
            out[i] = vecs[j]
            self.cache.put((self.name, texts[i], truncate), vecs[j].copy())

    def embed(self, texts: str | list[str], truncate: bool = True) -> np.ndarray:
        """Texts → float32 (n, dim); repeated texts come from the cache."""
        if isinstance(texts, str):
            texts = [texts]
        result, todo = self.lookup(texts, truncate)
        if todo:
            vecs = self.embed_ids(self.tokenize([texts[i] for i in todo], truncate))
            self.remember(texts, todo, vecs, truncate, result)
        return result

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        """Cosine similarity of the query to each document."""
        v = self.embed([query, *documents])
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v[1:] @ v[0]

    @property
    def labels(self) -> list[str]:
        c = self.config
        return [(c.id2label or {}).get(i, f"LABEL_{i}") for i in range(c.num_labels)]

    def classify(self, texts: str | list[str], truncate: bool = True) -> np.ndarray:
        """Texts → class probabilities (n, num_labels), softmax over the classifier's logits."""
        if not self.config.num_labels:
            raise InvalidRequestError(f"model {self.name} has no classification head", param="model")
        if isinstance(texts, str):
            texts = [texts]
        seqs = self.tokenize(texts, truncate)
        out = np.zeros((len(seqs), self.config.num_labels), dtype=np.float32)
        for batch in self._batches(seqs):
            _, logits = self._hidden_pooled([seqs[i] for i in batch])
            assert logits is not None
            out[batch] = torch.softmax(logits, dim=-1).cpu().numpy()
        return out
