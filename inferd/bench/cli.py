"""`inferd bench serve | compare | offline`."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from pathlib import Path

from inferd.cli_args import add_engine_args, load_llm
from inferd.errors import InferdError


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from exc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a server (any OpenAI-compatible) or the engine")
    bsub = p.add_subparsers(dest="bench_command", required=True)

    s = bsub.add_parser("serve", help="load-test an OpenAI-compatible server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    s.add_argument("--model", default="smollm2-135m", help="model name sent to the server")
    s.add_argument("--tokenizer", default=None,
                   help="local model whose tokenizer makes prompts and counts tokens (default: --model if local)")
    s.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    s.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64], help="comma-separated levels")
    s.add_argument("--num-prompts", type=int, default=200)
    s.add_argument("--input-len", type=int, default=128)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--dataset", default=None, help="JSONL file of {\"prompt\": ..., \"max_tokens\": ...}")
    s.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    s.add_argument("--price-per-hour", type=float, default=0.0, help="machine price, USD/hour")
    s.add_argument("--slo-ttft-ms", type=float, default=None)
    s.add_argument("--slo-tpot-ms", type=float, default=None)
    s.add_argument("--api-key", default=None)
    s.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    s.add_argument("--warmup", type=int, default=2, help="warm-up requests (not counted)")
    s.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", default="", help="name of the system under test (in results.json)")
    s.add_argument("--out", default="results", help="directory for results.json and plots")
    s.add_argument("--no-plots", action="store_true")
    s.set_defaults(func=cmd_serve)

    c = bsub.add_parser("compare", help="ratios between two results.json files (b / a)")
    c.add_argument("a")
    c.add_argument("b")
    c.set_defaults(func=cmd_compare)

    o = bsub.add_parser("offline", help="measure the engine without HTTP")
    add_engine_args(o)
    o.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64])
    o.add_argument("--input-len", type=int, default=128)
    o.add_argument("--output-len", type=int, default=128)
    o.add_argument("--seed", type=int, default=0)
    o.set_defaults(func=cmd_offline)


def cmd_serve(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inferd.bench.client import ClientConfig, run_load
    from inferd.bench.dataset import jsonl_requests, load_tokenizer, random_requests
    from inferd.bench.metrics import summarize
    from inferd.bench.report import plot, table, write_results

    tok = load_tokenizer(args.tokenizer or args.model)
    cfg = ClientConfig(args.base_url, args.model, args.endpoint, args.api_key, args.timeout,
                       ignore_eos=not args.no_ignore_eos)
    count = (lambda text: len(tok.encode(text, add_special_tokens=False))) if tok is not None else None
    levels = []
    for conc in args.concurrency:
        if args.dataset:
            reqs = jsonl_requests(args.dataset, args.num_prompts, args.output_len, args.seed, tok)
        else:
            reqs = random_requests(args.num_prompts, args.input_len, args.output_len, args.seed + conc, tok,
                                   token_ids=args.endpoint == "completions" and tok is not None)
        bar = tqdm(total=len(reqs), desc=f"concurrency {conc}", file=sys.stderr, leave=False)
        results, duration = asyncio.run(run_load(cfg, reqs, conc, args.request_rate, args.seed, args.warmup,
                                                 progress=lambda b=bar: b.update(1), count_tokens=count))
        bar.close()
        summary = summarize(results, duration, args.price_per_hour, args.slo_ttft_ms, args.slo_tpot_ms)
        levels.append({"concurrency": conc, "summary": summary})
        if summary["successful"] == 0:
            print(f"concurrency {conc}: every request failed: {summary['error_kinds']}", file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"date": datetime.datetime.now().isoformat()}
    out = Path(args.out)
    path = write_results(out, config, levels)
    print(table(levels))
    print(f"\nresults: {path}")
    if not args.no_plots:
        for p in plot(out, levels, args.label):
            print(f"plot: {p}")
    return 0 if any(lv["summary"]["successful"] for lv in levels) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from inferd.bench.report import compare

    try:
        a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InferdError(f"cannot read results: {exc}") from exc
    na = a.get("config", {}).get("label") or Path(args.a).parent.name or "a"
    nb = b.get("config", {}).get("label") or Path(args.b).parent.name or "b"
    print(compare(a, b, na, nb))
    return 0


def cmd_offline(args: argparse.Namespace) -> int:
    import statistics
    import time

    from inferd.bench.dataset import random_requests
    from inferd.sampling_params import SamplingParams

    llm = load_llm(args)
    print("| seqs | output tok/s (wall) | TTFT p50 ms | TPOT p50 ms |")
    print("|---|---|---|---|")
    for conc in args.concurrency:
        reqs = random_requests(conc, args.input_len, args.output_len, args.seed + conc, llm.tokenizer,
                               token_ids=True)
        sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([r.prompt for r in reqs], sp)
        wall = time.perf_counter() - t
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        ttft = statistics.median(o.metrics.ttft_s for o in outs) * 1000
        tpot = statistics.median(o.metrics.tpot_s or 0 for o in outs) * 1000
        print(f"| {conc} | {ntok / wall:.1f} | {ttft:.0f} | {tpot:.1f} |", flush=True)
    return 0
