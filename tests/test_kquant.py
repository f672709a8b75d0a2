"""GGUF K-quants and 5/6-bit types kept packed: exact block unpacking, the packed matmul on every kernel tier,
fused layers mixing types, a model loaded from such a file, and the errors and log lines around them."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from inferd import LLM
from inferd.errors import ModelLoadError
from inferd.loader.gguf import RawTensor
from inferd.ops import cpu_kernels
from inferd.ops.kernels import get_kernels, runnable_tiers, use_tier
from inferd.quant import gguf_blocks
from inferd.quant.apply import QuantConfig, packed_from_blocks, resolve_auto
from inferd.quant.linear import ConcatLinear, Int4Linear, Int8Linear, QKLinear, module_bytes, qk_layout
from tests import kquant_encoder
from tests.test_engine import prompt_logits
from tests.tiny_models import TINY_CONFIG, write_gguf, write_hf

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _raw(w: np.ndarray, type_name: str) -> np.ndarray:
    if type_name.endswith("_K"):
        return kquant_encoder.quantize(w, type_name)
    return gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, type_name))


def _gguf_dequant(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name)).reshape(shape)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_block_dequantization_equals_gguf(type_name):
    w = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32) * 0.1
    raw = _raw(w, type_name)
    want = _gguf_dequant(raw, type_name, w.shape)
    bl = gguf_blocks.unpack_blocks(raw, type_name, *w.shape)
    got = gguf_blocks.dequantize(bl)
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))  # bit-identical
    assert np.abs(want - w).max() < 0.2 * np.abs(w).max()  # and the test encoder made sensible blocks


# (part types of one fused layer, the layer it becomes)
CASES = [
    (("Q4_K",), QKLinear), (("Q5_0",), QKLinear), (("Q5_1",), QKLinear), (("Q5_K",), QKLinear),
    (("Q6_K",), QKLinear), (("Q4_K", "Q4_K", "Q6_K"), ConcatLinear), (("Q4_0", "Q5_K"), QKLinear),
    (("Q5_0", "Q5_0", "Q8_0"), Int8Linear), (("Q4_0", "Q4_1", "Q4_K"), Int4Linear), (("Q4_K", "Q5_K"), ConcatLinear),
]


@pytest.mark.parametrize("types,cls", CASES, ids=["+".join(c[0]) for c in CASES])
def test_packed_matmul_within_1pct_on_every_tier(types, cls):
    rng = np.random.default_rng(2)
    k = 512
    ws = [(rng.standard_normal((32, k)) * 0.05).astype(np.float32) for _ in types]
    raws = [_raw(w, t) for w, t in zip(ws, types)]
    deq = torch.from_numpy(np.concatenate([_gguf_dequant(r, t, w.shape) for r, t, w in zip(raws, types, ws)]))
    rts = [RawTensor(t, r, 32, k) for t, r in zip(types, raws)]
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    scale = float((x @ deq.T).abs().max())  # the output scale: the largest output of the 5-row step
    for tier in runnable_tiers():
        with use_tier(tier):
            for dense_rows in (0, 4):  # 4: a bf16 copy for steps of ≥ 4 rows (the 5-row step uses it)
                layer = packed_from_blocks(rts, None, QuantConfig("gguf", 32, dense_rows), torch.device("cpu"))
                assert isinstance(layer, cls), (tier, type(layer))
                if isinstance(layer, QKLinear):
                    assert layer.bits == max(gguf_blocks.BITS[t] for t in types)
                    assert layer.sub == (16 if "Q6_K" in types else 32)
                    assert layer.kmode == (set(types) <= gguf_blocks.K_TYPES)
                    if layer.kmode or set(types) <= {"Q5_0", "Q5_1"}:  # the file's own weights, bit for bit
                        assert torch.equal(layer.dequantized(), deq)
                if isinstance(layer, ConcatLinear):  # several K types: one part per run of one type, each as stored
                    runs = [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]
                    assert [(p.bits, p.kmode) for p in layer.parts] == [(gguf_blocks.BITS[t], True) for t in runs]
                    assert torch.equal(layer.dequantized(), deq)
                if isinstance(layer, (QKLinear, ConcatLinear)) and set(types) <= gguf_blocks.K_TYPES:
                    if not dense_rows and qk_layout(32, k) == "qkrows16":
                        # about the file's bytes (Q4_K/Q5_K keep their 6-bit scales as int8: 148/144, 180/176): no
                        # part widened to another type's bits (Q4_K as 6-bit per 16 would be 228/144)
                        assert module_bytes(layer) <= 1.03 * sum(r.nbytes for r in raws), (tier, module_bytes(layer))
                for rows in (1, 5):
                    for dt in (torch.float32, torch.bfloat16):
                        xi = x[:rows].to(dt)
                        ref = xi.float() @ deq.T  # fp32 from the same inputs, unquantized activations
                        y = layer(xi).float()
                        err = float((y - ref).abs().max()) / scale
                        assert err < 0.01, (tier, dense_rows, rows, dt, err)


def test_qk_layout_round_trips():
    from inferd.quant.linear import pack_qk_rows16, unpack_qk_rows16

    g = torch.Generator().manual_seed(0)
    for bits, sub in ((4, 16), (5, 32), (6, 16), (6, 32)):
        q = torch.randint(0, 1 << bits, (32, 96), generator=g, dtype=torch.uint8)
        d = torch.rand(32, 96 // sub, generator=g).half().float()
        m = -torch.rand(32, 96 // sub, generator=g).half().float()
        q2, d2, m2 = unpack_qk_rows16(*pack_qk_rows16(q, d, m, bits, sub), 32, 96, bits, sub)
        assert torch.equal(q, q2) and torch.equal(d, d2) and torch.equal(m, m2)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_embedding_rows_equal_the_dequantized_table(type_name):
    """A tied table's embedding lookup (QKLinear.dequantized_rows: only the asked rows unpacked, in the qkrows16
    layout straight from each buffer's row lane) equals the whole table dequantized, for every 4/5/6-bit type,
    K-quant scales or not, on every tier: rows of one block, repeated ids, the first and the last row."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    rt = RawTensor(type_name, _raw(w, type_name), *w.shape)
    ids = torch.tensor([0, 5, 17, 47, 17, 16, 31, 2])
    for tier in runnable_tiers():
        with use_tier(tier):
            layer = packed_from_blocks([rt], None, QuantConfig("gguf", 32, 0), torch.device("cpu"))
            assert isinstance(layer, QKLinear), (tier, type(layer))
            want = layer.dequantized()[ids]
            assert torch.equal(layer.dequantized_rows(ids), want), (tier, layer.layout)
            assert torch.equal(layer.dequantized_rows_torch(ids), want), (tier, layer.layout)
            assert torch.equal(layer.dequantized_rows(ids, torch.bfloat16), want.bfloat16()), (tier, layer.layout)
            if layer.layout == "qkrows16":  # the C rows (ops/csrc/qk_rows.c) ran: bit-identical to the torch path
                mode = 0 if not layer.kmode else (2 if layer.ksym else 1)
                assert mode == {"Q6_K": 2, "Q4_K": 1, "Q5_K": 1}.get(type_name, 0), (tier, mode)
                for dt in (torch.float32, torch.bfloat16):
                    c_rows = cpu_kernels.qk_rows(ids, layer.packed, layer.dm if mode == 0 else layer.scm, layer.sb,
                                                 layer.out_features, layer.in_features, layer.bits, layer.sub, mode, dt)
                    assert c_rows is not None and torch.equal(c_rows, want.to(dt)), (tier, dt)
                bad = torch.tensor([3, layer.out_features])  # an id past the table: no C rows, torch's IndexError
                assert cpu_kernels.qk_rows(bad, layer.packed, layer.dm if mode == 0 else layer.scm, layer.sb,
                                           layer.out_features, layer.in_features, layer.bits, layer.sub, mode) is None
                with pytest.raises(IndexError):
                    layer.dequantized_rows(bad)


def test_bf16_rows_of_a_nan_scale_stay_nan():
    """A NaN scale (fp16 0x7FFF, every mantissa bit set: a corrupt file) dequantizes to NaN in bf16, as in torch:
    the C rounding to bf16 once carried such a NaN into the sign bit and stored -0.0. (NaN bits differ: torch's
    vector conversion gives 0xFFFF, its scalar one and ours 0x7FC0.)"""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 64), generator=g, dtype=torch.uint8)
    d, m = torch.rand(16, 2, generator=g).half().float(), -torch.rand(16, 2, generator=g).half().float()
    ids = torch.tensor([0, 3])
    for tier in runnable_tiers():
        with use_tier(tier):
            layer = QKLinear(q, d, m, 4, 32)
            if layer.layout != "qkrows16":  # no C rows on this tier
                continue
            layer.dm.view(torch.int16).view(-1)[0] = 0x7FFF  # row 0's d of group 0
            want = layer.dequantized_rows_torch(ids).bfloat16()
            got = cpu_kernels.qk_rows(ids, layer.packed, layer.dm, None, 16, 64, 4, 32, 0, torch.bfloat16)
            assert got is not None and torch.isnan(want[0, 0])
            assert torch.equal(torch.isnan(got), torch.isnan(want)), tier
            assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), tier


def test_mixed_q8_and_k_layer_kept_dequantized():
    rng = np.random.default_rng(3)
    ws = [(rng.standard_normal((16, 256)) * 0.05).astype(np.float32) for _ in range(2)]
    rts = [RawTensor(t, _raw(w, t), 16, 256) for t, w in zip(("Q4_K", "Q8_0"), ws)]
    assert packed_from_blocks(rts, None, QuantConfig("gguf"), torch.device("cpu")) is None


def test_auto_packs_k_quant_files():
    qc = resolve_auto(QuantConfig("auto"), {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, torch.device("cpu"))
    from inferd.ops import cpu_kernels

    assert qc.method == ("gguf" if cpu_kernels.has_quant_gemm() else "none")
    assert resolve_auto(QuantConfig("auto"), {"Q4_K", "Q3_K"}, torch.device("cpu")).method == qc.method
    assert resolve_auto(QuantConfig("auto"), {"F16"}, torch.device("cpu")).method == "none"


KQ_CONFIG = {**TINY_CONFIG, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 2}
# a Q4_K_M-like mix in layer 0, every other type in layer 1
LAYER_TYPES = {
    0: {"q": "Q4_K", "k": "Q4_K", "v": "Q6_K", "o": "Q4_K", "gate": "Q4_K", "up": "Q4_K", "down": "Q6_K"},
    1: {"q": "Q5_K", "k": "Q5_1", "v": "Q5_0", "o": "Q4_0", "gate": "Q5_0", "up": "Q8_0", "down": "Q4_1"},
}


def _type_of(name: str, types: dict[int, dict[str, str]]) -> str | None:
    if not name.startswith("model.layers.") or not name.endswith("proj.weight"):
        return "Q8_0" if name == "model.embed_tokens.weight" else None
    layer = int(name.split(".")[2])
    return types[layer][name.split(".")[-2].removesuffix("_proj")]


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("kq")
    hf = write_hf(d / "hf", config=KQ_CONFIG)
    return write_gguf(d / "kq.gguf", hf, quant=lambda n: _type_of(n, LAYER_TYPES))


def test_k_quant_model_loads_packed(kquant_model):
    from inferd.ops import cpu_kernels

    dense = LLM(str(kquant_model), dtype="float32", kv_cache_memory=0.01, quantization="none")
    packed = LLM(str(kquant_model), dtype="float32", kv_cache_memory=0.01, quantization="gguf")
    layers = packed.engine.lm.model.model.layers
    l0, l1 = layers[0], layers[1]
    qkv0 = l0.self_attn.qkv_proj  # Q4_K q, k + Q6_K v: two parts, each in its own type
    assert isinstance(qkv0, ConcatLinear) and [p.bits for p in qkv0.parts] == [4, 6]
    assert all(isinstance(m, QKLinear) and m.kmode for m in (*qkv0.parts, l0.self_attn.o_proj,
                                                              l0.mlp.gate_up_proj, l0.mlp.down_proj))
    assert isinstance(l1.self_attn.qkv_proj, QKLinear) and l1.self_attn.qkv_proj.bits == 5
    assert isinstance(l1.mlp.gate_up_proj, Int8Linear) and isinstance(l1.mlp.down_proj, Int4Linear)
    ids = packed.tokenizer.encode("The capital of France is Paris. The quick brown fox")
    a, b = prompt_logits(dense.engine, ids), prompt_logits(packed.engine, ids)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.995, cos.min()  # the same weights; int8 activations (and fp16 K-quant scales) differ
    linears = sum(module_bytes(m) for layer in layers for m in (layer.self_attn, layer.mlp))
    stored = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(kquant_model)).tensors
                 if t.name.startswith("blk.") and len(t.shape) == 2)
    if cpu_kernels.has_quant_gemm():  # the packed layouts (other tiers keep unpacked fallbacks)
        assert linears < 1.25 * stored, (linears, stored)  # fused mixes widen a few parts; see the README table
    from inferd import SamplingParams

    # decode through the fused C decoder (qk_gemm descriptors) gives the layer-by-layer path's tokens
    plain = LLM(str(kquant_model), dtype="float32", kv_cache_memory=0.01, quantization="gguf")
    plain.engine.lm.model._fused = None
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The capital", "the quick brown fox jumps"]
    assert [o.outputs[0].token_ids for o in packed.generate(prompts, sp)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, sp)]
    # one row: the ConcatLinear qkv's parts write their slices of the output in place (two rows: via a buffer)
    assert packed.generate(prompts[:1], sp)[0].outputs[0].token_ids == plain.generate(prompts[:1], sp)[0].outputs[0].token_ids
    decoder = packed.engine.lm.model._fused
    assert (decoder is not None and decoder.steps > 0) == cpu_kernels.has_quant_gemm()


def test_unpackable_mix_logs_one_line(tmp_path, caplog):
    hf = write_hf(tmp_path / "hf", config=KQ_CONFIG)
    types = {i: {**LAYER_TYPES[0], "v": "Q8_0"} for i in (0, 1)}  # Q4_K + Q8_0 in qkv: no common layout
    path = write_gguf(tmp_path / "mix.gguf", hf, quant=lambda n: _type_of(n, types))
    with caplog.at_level(logging.INFO, logger="inferd.quant.apply"):
        llm = LLM(str(path), dtype="float32", kv_cache_memory=0.01, quantization="gguf")
    lines = [r.getMessage() for r in caplog.records if "kept dequantized" in r.getMessage()]
    assert len(lines) == 1 and "Q4_K,Q8_0" in lines[0] and "MB in memory" in lines[0], lines
    assert isinstance(llm.engine.lm.model.model.layers[0].mlp.gate_up_proj, QKLinear)


def test_unsupported_tensor_type_is_a_one_line_error(tmp_path):
    hf = write_hf(tmp_path / "hf", config=KQ_CONFIG)
    path = write_gguf(tmp_path / "i32.gguf", hf)  # float32 tensors
    # one linear's type id rewritten in the header from F32 to I32 (same bytes per weight; gguf has no dequantizer)
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == int(gguf.GGMLQuantizationType.F32)
    data[type_at:type_at + 4] = int(gguf.GGMLQuantizationType.I32).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    for quantization in ("auto", "gguf"):
        with pytest.raises(ModelLoadError) as exc:
            LLM(str(path), dtype="float32", kv_cache_memory=0.01, quantization=quantization)
        msg = str(exc.value)
        assert "\n" not in msg and "I32" in msg and "blk.0.ffn_up.weight" in msg, msg


def test_repack_cache_keeps_k_quant_layers(kquant_model, tmp_path, monkeypatch):
    """The second load maps QKLinear layers (both scale forms) from the repack cache: nothing repacked, same tokens."""
    from inferd import SamplingParams
    from inferd.quant import apply

    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INFERD_REPACK_CACHE", raising=False)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs, repacked = [], []
    for _ in range(2):
        before = apply.REPACKS
        llm = LLM(str(kquant_model), quantization="gguf", dtype="float32", kv_cache_memory=0.01)
        outs.append(llm.generate([[5, 6, 7, 8, 9]], sp)[0].outputs[0].token_ids)
        repacked.append(apply.REPACKS - before)
        layers = llm.engine.lm.model.model.layers
    assert repacked == [8, 0] and outs[0] == outs[1]
    assert layers[0].mlp.down_proj.kmode and not layers[1].self_attn.qkv_proj.kmode
    qkv0 = layers[0].self_attn.qkv_proj  # a ConcatLinear's parts come back as one layer
    assert isinstance(qkv0, ConcatLinear) and [p.bits for p in qkv0.parts] == [4, 6]


def _tied_gguf(tmp_path, table_type: str):
    """A tiny tied-embedding model whose embedding/output table is stored as `table_type` (as Llama 3.2 /
    Qwen2.5 Q4_K_M files store theirs as Q6_K) and its decoder as Q4_K_M-like layer 0 types."""
    from safetensors.torch import load_file, save_file

    hf = write_hf(tmp_path / "hf", config={**KQ_CONFIG, "tie_word_embeddings": True})
    weights = load_file(str(hf / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(hf / "model.safetensors"))
    types = {i: LAYER_TYPES[0] for i in (0, 1)}

    def quant(name: str) -> str | None:
        return table_type if name == "model.embed_tokens.weight" else _type_of(name, types)

    return write_gguf(tmp_path / f"tied_{table_type}.gguf", hf, quant=quant)


@pytest.mark.parametrize("table_type", ["Q6_K", "Q4_K", "Q5_0"])
def test_tied_k_quant_head_stays_packed_on_every_tier(tmp_path, table_type):
    """A tied table stored as a K-quant/Q5 type stays packed as the lm_head (QKLinear, the file's bytes) on every
    tier: its logits are within 1% of output scale of the dequantized fp32 head, every greedy token is the argmax
    of an fp32 head of the same weights (or a near tie within 1% of scale: the int8 activations, as llama.cpp's,
    move logits ~0.5%), and the embedding lookup is the file's rows exactly."""
    from inferd import SamplingParams
    from inferd.models.blocks import logits_fp32
    from inferd.quant.linear import QKEmbedding

    path = _tied_gguf(tmp_path, table_type)
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == table_type
    table = torch.from_numpy(_gguf_dequant(np.asarray(tensor.data), table_type, (int(tensor.shape[1]),
                                                                                 int(tensor.shape[0]))))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["The capital", "the quick brown fox jumps"]
    for tier in runnable_tiers() if table_type == "Q6_K" else runnable_tiers()[:1]:  # the others: the best tier
        with use_tier(tier):
            llm = LLM(str(path), dtype="float32", kv_cache_memory=0.01, quantization="gguf")
            model = llm.engine.lm.model
            head, emb = model.lm_head, model.model.embed_tokens
            if not get_kernels().quant_gemm:  # no qk_gemm: the int8 head (aten's kernel), as before
                assert isinstance(head, Int8Linear) and not isinstance(emb, QKEmbedding), tier
                continue
            assert isinstance(head, QKLinear) and isinstance(emb, QKEmbedding), (tier, type(head), type(emb))
            assert head.bits == gguf_blocks.BITS[table_type] and head.dense is None
            assert module_bytes(head) <= 1.1 * int(tensor.n_bytes), (tier, module_bytes(head), tensor.n_bytes)
            assert torch.equal(head.dequantized(), table)  # the file's own weights, bit for bit
            ids = torch.tensor([[0, 17, 5], [table.shape[0] - 1, 17, 300]])
            assert torch.equal(emb(ids), table[ids])  # only the looked-up rows, exact
            x = torch.from_numpy(np.random.default_rng(3).standard_normal((5, table.shape[1])).astype(np.float32))
            ref = x @ table.T
            y = logits_fp32(head, x)
            assert y.dtype == torch.float32
            err = float((y - ref).abs().max()) / float(ref.abs().max())
            assert err < 0.01, (tier, err)
            got = [llm.tokenizer.encode(p) + o.outputs[0].token_ids for p, o in zip(prompts, llm.generate(prompts, sp))]
            dense = torch.nn.Linear(table.shape[1], table.shape[0], bias=False)
            dense.weight.data = table.clone()
            model.lm_head = dense  # the same model with an fp32 head of the same weights
            for seq in got:  # each greedy token is the fp32 head's argmax, or within 1% of scale of it (a near tie)
                want = prompt_logits(llm.engine, seq[:-1])[-sp.max_tokens:]
                picked = want.gather(1, torch.tensor(seq[-sp.max_tokens:]).unsqueeze(1)).squeeze(1)
                gap = (want.max(1).values - picked) / want.abs().max()
                assert float(gap.max()) < 0.01, (tier, gap)
