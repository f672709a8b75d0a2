"""Structured outputs: what a JSON schema on every request costs, how long grammars take to compile, and
document extraction throughput.

    python benchmarks/structured.py [--model smollm2-135m] [--streams 16] [--seconds 30] [--rounds 2] [--docs 100]

1. Throughput: `--streams` requests always in flight through one engine (a closed loop: a finished request is
   replaced at once), for `--seconds`, once unconstrained and once with a JSON schema on every request (the
   schema suite of tests/structured_schemas.py, round robin), alternating `--rounds` times in the same run.
   Output tokens/s of each, and their ratio. Both use the same prompts; the unconstrained requests generate
   exactly the constrained ones' mean output length (ignore_eos), so both runs do the same prefill/decode mix.
2. Grammar compile time over the schema suite (each compiled fresh, 5 times): p50 / p99; mask time per
   constrained token (the sampler's mask time divided by the constrained rows it masked).
3. `inferd extract` on `--docs` generated invoices (a subprocess, as a user runs it): documents/s and cost per
   1,000 documents at `--price-per-hour`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inferd import LLM, SamplingParams  # noqa: E402
from inferd.structured import StructuredOutputsParams  # noqa: E402
from inferd.structured.compiler import grammar_text  # noqa: E402
from tests.structured_schemas import SCHEMAS  # noqa: E402

PROMPTS = ["Describe a customer as JSON.", "Extract the invoice fields.", "Summarise the contract terms.",
           "List the items in the order.", "Give the shipping address.", "What is the status of the claim?"]


def closed_loop(llm: LLM, streams: int, seconds: float, constrained: bool, max_tokens: int,
                ignore_eos: bool = False) -> dict:
    eng = llm.engine
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    schemas = list(SCHEMAS.values())
    k = 0

    def add() -> None:
        nonlocal k
        so = StructuredOutputsParams(json=schemas[k % len(schemas)]) if constrained else None
        eng.add_request(f"{'c' if constrained else 'u'}{k}", prompts[k % len(prompts)],
                        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=k, structured_outputs=so,
                                       ignore_eos=ignore_eos))
        k += 1

    if constrained:
        for s in schemas:  # compiles happen off the measured window, as a server's cache would hold them
            eng.grammar_compiler().compile(StructuredOutputsParams(json=s))
    for _ in range(streams):
        add()
    tokens, done, tokens_done, steps = 0, 0, 0, 0
    stats = eng.grammar_compiler().stats
    mask0, compute0 = sum(stats.mask_s), eng.total_compute_s
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        steps += 1
        for ro in eng.step():
            tokens += sum(len(co.delta_token_ids) for co in ro.outputs)
            if ro.finished:
                done += 1
                tokens_done += len(ro.outputs[0].token_ids)
                add()
    wall = time.perf_counter() - t0
    lengths = [len(c.output_token_ids) for g in eng.groups.values() for c in g.children]
    for rid in list(eng.groups):
        eng.abort_request(rid)
    return {"tok_s": tokens / wall, "requests": done, "tokens": tokens, "wall_s": wall, "steps": steps,
            "mask_share": (sum(stats.mask_s) - mask0) / max(1e-9, eng.total_compute_s - compute0),
            "mean_len": (tokens_done / done) if done else statistics.mean(lengths)}


def compile_times(llm: LLM, reps: int = 5) -> list[float]:
    import llguidance as llg

    tok = llm.engine.grammar_compiler().lltokenizer
    out = []
    for _ in range(reps):
        for s in SCHEMAS.values():
            t0 = time.perf_counter()
            m = llg.LLMatcher(tok, grammar_text(StructuredOutputsParams(json=s)), log_level=0)
            assert not m.is_error(), m.get_error()
            out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


INVOICE = {"type": "object", "additionalProperties": False,
           "required": ["vendor", "invoice_no", "date", "total", "currency"],
           "properties": {"vendor": {"type": "string", "maxLength": 40},
                          "invoice_no": {"type": "string", "pattern": "^[A-Z0-9-]{1,16}$"},
                          "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                          "total": {"type": "number", "minimum": 0, "maximum": 1000000},
                          "currency": {"enum": ["EUR", "USD", "GBP"]}}}


def extract_run(model: str, n_docs: int, price: float) -> dict:
    rng = random.Random(0)
    vendors = ["ACME GmbH", "Globex Ltd", "Initech SA", "Umbrella plc", "Stark Industries", "Wayne Enterprises"]
    with tempfile.TemporaryDirectory() as d:
        docs = []
        for i in range(n_docs):
            p = Path(d) / f"invoice{i:03d}.txt"
            cur = rng.choice(["EUR", "USD", "GBP"])
            p.write_text(f"INVOICE {rng.choice('ABC')}-{rng.randint(100, 9999)}\nFrom: {rng.choice(vendors)}\n"
                         f"Date: 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}\n"
                         f"Items: {rng.randint(1, 9)} x consulting days\nTotal due: {rng.randint(100, 99999)}.00 {cur}\n"
                         "Payment within 30 days.\n")
            docs.append(str(p))
        schema = Path(d) / "schema.json"
        schema.write_text(json.dumps(INVOICE))
        out = Path(d) / "out.jsonl"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "inferd.cli", "extract", "--schema", str(schema), "--model", model,
                            "--max-tokens", "96", "--price-per-hour", str(price), *docs, "-o", str(out)],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        summary = r.stderr.strip().splitlines()[-1]
        lines = [json.loads(x) for x in out.read_text().splitlines()]
    m = re.search(r"in ([0-9.]+) s: ([0-9.]+) docs/s, ([0-9.]+) compute s", summary)
    assert m, summary
    ok = sum("data" in x for x in lines)
    return {"docs": n_docs, "ok": ok, "docs_s": float(m.group(2)), "run_s": float(m.group(1)),
            "process_s": wall, "compute_s": float(m.group(3)),
            "usd_per_1000_wall": float(m.group(1)) * price / 3600 / n_docs * 1000, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--no-jump-forward", action="store_true", help="sample grammar-forced tokens one by one")
    ap.add_argument("--price-per-hour", type=float, default=0.10, help="USD per machine hour for the cost figures")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, model {args.model}, "
          f"{args.streams} streams, {args.seconds:.0f} s x {args.rounds} rounds each")
    llm = LLM(args.model, max_num_seqs=max(args.streams, 16))
    llm.engine.jump_forward = not args.no_jump_forward
    res: dict[str, list[dict]] = {"free": [], "json_schema": []}
    closed_loop(llm, args.streams, 5, False, args.max_tokens)  # warm-up
    for _ in range(args.rounds):  # free requests get the JSON outputs' mean length (ignore_eos): same work shape
        c = closed_loop(llm, args.streams, args.seconds, True, args.max_tokens)
        res["json_schema"].append(c)
        n = max(1, round(c["mean_len"]))
        res["free"].append(closed_loop(llm, args.streams, args.seconds, False, n, ignore_eos=True))
    stats = llm.engine.grammar_compiler().stats
    mask_per_token_us = sum(stats.mask_s) / max(1, stats.mask_rows) * 1e6
    mask_per_step_ms = statistics.mean(stats.mask_s) * 1e3 if stats.mask_s else 0.0
    free = sum(r["tok_s"] for r in res["free"]) / len(res["free"])
    cons = sum(r["tok_s"] for r in res["json_schema"]) / len(res["json_schema"])
    for k, rs in res.items():
        print(f"{k:12s} " + "  ".join(f"{r['tok_s']:.1f} tok/s ({r['requests']} req, {r['steps']} steps, "
                                      f"mean {r['mean_len']:.1f} tok)" for r in rs))
    print(f"output tok/s: unconstrained {free:.1f}, json_schema {cons:.1f}, ratio {cons / free:.3f}")
    share = statistics.mean(r["mask_share"] for r in res["json_schema"])
    print(f"mask time / engine step time in the json_schema phases: {share * 100:.1f}%")
    print(f"mask: {mask_per_token_us:.1f} us per constrained token, {mask_per_step_ms:.2f} ms per step "
          f"({stats.mask_rows / max(1, len(stats.mask_s)):.1f} constrained rows per step)")
    ct = compile_times(llm)
    print(f"compile ({len(SCHEMAS)} schemas x 5, fresh): p50 {pct(ct, 0.5) * 1e3:.2f} ms, p99 {pct(ct, 0.99) * 1e3:.2f} ms,"
          f" max {max(ct) * 1e3:.2f} ms")
    if args.docs:
        ex = extract_run(args.model, args.docs, args.price_per_hour)
        print(f"extract: {ex['ok']}/{ex['docs']} documents valid, {ex['docs_s']:.2f} docs/s "
              f"(process incl. model load {ex['process_s']:.1f} s), ${ex['usd_per_1000_wall']:.4f} per 1000 docs "
              f"at ${args.price_per_hour}/h")
        print(f"  {ex['summary']}")


if __name__ == "__main__":
    main()
