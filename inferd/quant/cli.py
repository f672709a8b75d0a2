"""`inferd quantize SRC DST` and `inferd eval perplexity`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inferd.cli_args import add_engine_args, load_llm
from inferd.errors import InferdError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write an int8/int4 weight-only quantized copy of a model")
    p.add_argument("src", help="known model name, .gguf file or HF directory")
    p.add_argument("dst", help="output directory (loads with --model DST)")
    p.add_argument("--method", choices=["int8", "int4"], required=True)
    p.add_argument("--group-size", type=int, default=32,
                   help="int4 group size (32, 64, 128; must divide every layer's input features)")
    p.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_command", required=True)
    pp = esub.add_parser("perplexity", help="perplexity of a model on a text file")
    add_engine_args(pp)
    pp.add_argument("--file", required=True, help="UTF-8 text file")
    pp.add_argument("--context", type=int, default=512, help="window length in tokens")
    pp.add_argument("--stride", type=int, default=256, help="window step in tokens")
    pp.set_defaults(func=cmd_perplexity)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from inferd.hardware import pick_device
    from inferd.models.registry import load_model
    from inferd.quant.apply import QuantConfig
    from inferd.quant.io import save_quantized

    qc = QuantConfig(args.method, args.group_size)
    lm = load_model(args.src, torch.float32, pick_device("cpu"))
    bar = tqdm(total=lm.config.num_layers * 4 + 1, desc=f"quantize {args.method}", unit="layer", file=sys.stderr)
    dst = save_quantized(lm, args.dst, qc, progress=lambda k, n: bar.update(1))
    bar.close()
    size = sum(f.stat().st_size for f in Path(dst).glob("*.safetensors"))
    print(f"wrote {dst} ({size / 1e6:.1f} MB of weights, {args.method}"
          f"{f', group {args.group_size}' if args.method == 'int4' else ''})")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from inferd.quant.perplexity import perplexity

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InferdError(f"cannot read {args.file}: {exc}") from exc
    if args.max_model_len is None:
        args.max_model_len = max(args.context, 512)
    llm = load_llm(args)
    ids = llm.tokenizer.encode(text)
    ppl, n = perplexity(llm.engine, ids, args.context, args.stride)
    print(f"perplexity {ppl:.4f} over {n} tokens (model {args.model}, dtype {llm.engine.lm.dtype}, "
          f"quantization {args.quantization}, context {args.context}, stride {args.stride})")
    return 0
