"""A 1B-class model, where decode is bound by memory bandwidth: a random-weight Llama-3.2-1B-shaped GGUF (hidden
2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, tied embeddings; SmolLM2's tokenizer, so the vocabulary
is 49152 instead of 128256), quantized by llama.cpp's own quantize (through llama-cpp-python) to Q4_0, Q8_0 and
Q4_K_M; single-stream and 16-stream greedy decode of inferd (`-q gguf`: the blocks kept packed) and of llama.cpp
(llama-cpp-python's low-level batch API: 16 sequences decoded in one `llama_decode` per step, as llama-server
does) on the same files, in the same run: per file and stream count, `--rounds` alternations of inferd (loaded
once, warmed up) and llama.cpp (a fresh process, best of 2), each best of 2; the table shows the medians, their
ratio and each round's ratio. Also the machine's memory bandwidth (a torch copy of a 1 GiB tensor) and the GB/s
each engine achieves (weight bytes read per decode step × steps per second).

    python benchmarks/kquant_1b.py --peer-python /tmp/peers/bin/python --dir /tmp/kq1b [--types Q4_0 Q8_0 Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "inter": 8192}

PEER = r"""
import json, sys, time
import numpy as np
import llama_cpp as L
path, threads, streams, plen, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
nv = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
cp = L.llama_context_default_params()
cp.n_ctx = streams * (plen + steps + 16); cp.n_batch = cp.n_ubatch = max(512, streams * plen)
cp.n_seq_max = streams; cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(cp.n_batch, 0, streams)

def run(entries):
    batch.n_tokens = len(entries)
    for i, (t, p, s, lg) in enumerate(entries):
        batch.token[i] = t; batch.pos[i] = p; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = s; batch.logits[i] = lg
    assert L.llama_decode(ctx, batch) == 0

def argmax(i):
    return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(nv,)).argmax())

rng = np.random.default_rng(0)
best = 0.0
for rep in range(2):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    prompts = rng.integers(100, nv - 100, size=(streams, plen))
    run([(int(prompts[s, i]), i, s, i == plen - 1) for s in range(streams) for i in range(plen)])
    toks = [argmax(s * plen + plen - 1) for s in range(streams)]
    t = time.perf_counter()
    for step in range(steps):
        run([(toks[s], plen + step, s, True) for s in range(streams)])
        toks = [argmax(s) for s in range(streams)]
    best = max(best, streams * steps / (time.perf_counter() - t))
print(json.dumps({"decode_tok_s": best}))
"""

QUANTIZE = r"""
import ctypes, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def write_f16(path: Path, tokenizer_from: Path, seed: int = 0) -> None:
    """The random model as an F16 GGUF (llama architecture), with the tokenizer fields of `tokenizer_from`."""
    import gguf

    src = gguf.GGUFReader(str(tokenizer_from))
    h, n_layers, heads, kvh, inter = (SHAPE[k] for k in ("hidden", "layers", "heads", "kv_heads", "inter"))
    d = h // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(2048)
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kvh)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = 0
    for name, field in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if name == "tokenizer.ggml.tokens":
            vocab = len(value)
        w.add_key_value(name, value, vtype, sub_type=sub)
    w.add_vocab_size(vocab)
    rng = np.random.default_rng(seed)

    def rnd(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", rnd(vocab, h))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(n_layers):
        p = f"blk.{i}"
        for name, shape in (("attn_q", (h, h)), ("attn_k", (kvh * d, h)), ("attn_v", (kvh * d, h)),
                            ("attn_output", (h, h)), ("ffn_gate", (inter, h)), ("ffn_up", (inter, h)),
                            ("ffn_down", (h, inter))):
            w.add_tensor(f"{p}.{name}.weight", rnd(*shape))
        w.add_tensor(f"{p}.attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(f"{p}.ffn_norm.weight", np.ones(h, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def memory_bandwidth_gbs() -> float:
    """A torch copy of a 1 GiB tensor (1 GiB read + 1 GiB written), best of 5."""
    import torch

    a = torch.ones(1 << 28, dtype=torch.float32)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


class InferdDecode:
    """inferd on one file, loaded once and measured in rounds (between which the peer runs)."""

    def __init__(self, path: Path, max_streams: int, plen: int, steps: int):
        from inferd import LLM
        from inferd.quant.linear import module_bytes

        self.plen, self.steps = plen, steps
        self.llm = LLM(str(path), quantization="gguf", quant_dense_rows=0, max_model_len=plen + steps + 16,
                       kv_cache_memory=0.5, enable_prefix_caching=False, max_num_seqs=max_streams)
        model = self.llm.engine.lm.model
        self.weight_bytes = module_bytes(model)  # the bytes of weights a decode step reads
        self.vocab = model.config.vocab_size
        self.rng = np.random.default_rng(0)

    def tok_s(self, streams: int) -> float:
        """Best of 2 decode tok/s (decode time: from the last stream's first token to the end)."""
        from inferd import SamplingParams

        best = 0.0
        for _ in range(2):
            prompts = [self.rng.integers(100, self.vocab - 100, size=self.plen).tolist() for _ in range(streams)]
            outs = self.llm.generate(prompts, SamplingParams(max_tokens=self.steps + 1, temperature=0,
                                                             ignore_eos=True))
            # decode only: from the last stream's first token to the last stream's end (all streams decoding)
            span = max(o.metrics.e2e_s for o in outs) - max(o.metrics.ttft_s for o in outs)
            best = max(best, streams * self.steps / span)
        return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kq1b"))
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0", "Q4_K_M"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3,
                    help="inferd and llama.cpp measured alternately this many times per stream count (medians shown)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of both engines (1 on an oversubscribed host: OpenMP's 2-thread barriers then cost "
                         "more than the second core gives)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import gguf
    import torch

    torch.set_num_threads(args.threads)

    from inferd.hardware import machine_info
    from inferd.loader.hub import resolve
    from inferd.ops.kernels import get_kernels

    args.dir.mkdir(parents=True, exist_ok=True)
    f16 = args.dir / "llama1b-random-f16.gguf"
    if not f16.is_file():
        write_f16(f16, resolve("smollm2-135m"))
    bw = memory_bandwidth_gbs()
    threads = args.threads
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine_info()}, inferd kernel tier {get_kernels().tier}, "
          f"{threads} threads; memory bandwidth (torch copy of 1 GiB) {bw:.1f} GB/s")
    print("| file | MB | streams | llama.cpp tok/s | inferd tok/s | ratio | ratio per round | llama.cpp GB/s | "
          "inferd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for qt in args.types:
        path = args.dir / f"llama1b-random-{qt}.gguf"
        if not path.is_file():
            subprocess.run([args.peer_python, "-c", QUANTIZE, str(f16), str(path), qt], check=True,
                           capture_output=True)
        file_weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
        ours = InferdDecode(path, max(args.streams), args.prompt_len, args.steps)
        runs: dict[int, list[tuple[float, float]]] = {n: [] for n in args.streams}
        ours.tok_s(max(args.streams))  # warm-up: the mapped weights faulted in, the KV pages touched
        for rnd in range(args.rounds):  # inferd and the peer alternate, so a slow spell of a shared host hits both
            for streams in args.streams:
                o = ours.tok_s(streams)
                peer = json.loads(subprocess.run(
                    [args.peer_python, "-c", PEER, str(path), str(threads), str(streams), str(args.prompt_len),
                     str(args.steps)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                runs[streams].append((peer["decode_tok_s"], o))
                print(f"{qt} round {rnd + 1}, {streams} streams: llama.cpp {peer['decode_tok_s']:.1f}, inferd {o:.1f} "
                      f"tok/s ({o / peer['decode_tok_s']:.2f}x)", file=sys.stderr, flush=True)
        our_bytes = ours.weight_bytes
        del ours
        for streams in args.streams:
            p = statistics.median(r[0] for r in runs[streams])
            o = statistics.median(r[1] for r in runs[streams])
            each = ", ".join(f"{b / a:.2f}x" for a, b in runs[streams])
            print(f"| {qt} | {path.stat().st_size / 1e6:.0f} | {streams} | {p:.2f} | {o:.2f} | {o / p:.2f}x | {each} | "
                  f"{file_weights * p / streams / 1e9:.1f} | {our_bytes * o / streams / 1e9:.1f} |", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
