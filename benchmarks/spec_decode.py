"""Speculative decoding (prompt lookup) with and without, same run, same loaded model.

Two workloads of 50 prompts each, made reproducibly here (seeded):
- extraction: a synthetic record (invoice / ticket / contract clause) and an instruction to copy fields out of it,
  so the answer repeats spans of the prompt (where prompt lookup should help);
- chat: free-form questions (where proposals rarely match; the adaptive policy must keep it from being slower).
For each: single-stream tokens/s (one request at a time, greedy, chat template) and 16 concurrent streams,
acceptance rate and mean accepted length per verification run, and whether outputs were identical.

    python benchmarks/spec_decode.py [--dtype bfloat16] [--quantization auto none] [--json out.json] [--n 50]
                                     [--draft-model M]   # a draft model instead of prompt lookup
                                     [--workloads extraction chat] [--rounds R]  # R alternating slices
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from dataclasses import replace

from inferd import LLM, SamplingParams
from inferd.config import SpeculativeConfig
from inferd.engine.llm_engine import LLMEngine, run_to_completion
from inferd.hardware import machine_info

NAMES = ["Alice Martin", "Bob Chen", "Carla Diaz", "David Okafor", "Eva Novak", "Farid Haddad", "Grace Lee"]
ITEMS = ["steel bolts", "copper wire", "LED panels", "oak planks", "printer toner", "safety gloves", "cable ties"]
CITIES = ["Lyon", "Osaka", "Denver", "Leeds", "Porto", "Tartu", "Quito"]
TOPICS = ["why the sky is blue", "how bread rises", "the history of chess", "what a black hole is",
          "how to learn a language", "why cats purr", "how vaccines work", "what makes music sad",
          "how bees communicate", "the rules of cricket"]


def extraction_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, city, item = rng.choice(NAMES), rng.choice(CITIES), rng.choice(ITEMS)
        qty, price = rng.randint(2, 900), rng.randint(100, 99999) / 100
        inv = f"INV-{rng.randint(10000, 99999)}"
        doc = (f"Invoice {inv}\nDate: 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}\n"
               f"Bill to: {name}, {rng.randint(1, 300)} Market Street, {city}\n"
               f"Item: {qty} x {item} at {price:.2f} EUR each\nTotal: {qty * price:.2f} EUR\n"
               f"Notes: deliver to the loading dock at the {city} warehouse before noon; call {name} on arrival.")
        ask = ["Copy the invoice number, the customer name, the address and the total, one per line.",
               "Repeat the 'Bill to' line and the 'Notes' line exactly.",
               "Rewrite this invoice as a list of 'field: value' lines."][i % 3]
        out.append(f"{doc}\n\n{ask}")
    return out


def chat_prompts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    styles = ["Explain {} to a child.", "Write a short poem about {}.", "Give three surprising facts about {}.",
              "In one paragraph, tell me {}."]
    return [rng.choice(styles).format(rng.choice(TOPICS)) for _ in range(n)]


def run(engine: LLMEngine, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    tok = engine.tokenizer
    ids = [tok.encode_chat([{"role": "user", "content": p}], True) for p in prompts]
    d0, a0, r0 = engine.spec_draft_tokens, engine.spec_accepted_tokens, engine.spec_drafts
    outs: dict[str, list[int]] = {}
    t = time.perf_counter()
    for start in range(0, len(ids), concurrency):
        for i in range(start, min(start + concurrency, len(ids))):
            engine.add_request(str(i), ids[i], sp)
        for rid, ro in run_to_completion(engine).items():
            outs[rid] = ro.outputs[0].token_ids
    dt = time.perf_counter() - t
    n_tok = sum(len(v) for v in outs.values())
    drafts, acc, runs = (engine.spec_draft_tokens - d0, engine.spec_accepted_tokens - a0, engine.spec_drafts - r0)
    return {"tok_s": n_tok / dt, "tokens": n_tok, "seconds": dt, "outputs": [outs[str(i)] for i in range(len(ids))],
            "draft_tokens": drafts, "accepted": acc, "runs": runs, "acceptance": acc / drafts if drafts else None,
            "mean_accepted_per_run": acc / runs if runs else None}


def alternating(base: LLMEngine, spec: LLMEngine, prompts: list[str], max_tokens: int, concurrency: int,
                rounds: int) -> tuple[dict, dict]:
    """The prompts in `rounds` slices, each run without then with speculation, so a load change on a shared host
    hits both arms alike; tokens, seconds and speculation counters summed over the slices. A slice holds at least
    `concurrency` prompts (so 16 streams means 16: use --n ≥ rounds × concurrency to alternate there too)."""
    size = max(-(-len(prompts) // rounds), concurrency)
    parts: tuple[list[dict], list[dict]] = ([], [])
    for i in range(0, len(prompts), size):
        parts[0].append(run(base, prompts[i : i + size], max_tokens, concurrency))
        parts[1].append(run(spec, prompts[i : i + size], max_tokens, concurrency))
    out = []
    for arm in parts:
        tok, sec = sum(p["tokens"] for p in arm), sum(p["seconds"] for p in arm)
        drafts, acc, runs = (sum(p[k] for p in arm) for k in ("draft_tokens", "accepted", "runs"))
        out.append({"tok_s": tok / sec, "tokens": tok, "seconds": sec, "outputs": [o for p in arm for o in p["outputs"]],
                    "draft_tokens": drafts, "accepted": acc, "runs": runs,
                    "acceptance": acc / drafts if drafts else None, "mean_accepted_per_run": acc / runs if runs else None})
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", nargs="+", default=["auto", "none"])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--ngram-min", type=int, default=SpeculativeConfig.ngram_min)
    ap.add_argument("--ngram-max", type=int, default=SpeculativeConfig.ngram_max)
    ap.add_argument("--draft-model", default=None, help="speculate with this draft model instead of prompt lookup")
    ap.add_argument("--workloads", nargs="+", choices=["extraction", "chat"], default=["extraction", "chat"])
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate without/with over this many slices of the prompts (a shared, loaded host)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = {"extraction": extraction_prompts(args.n), "chat": chat_prompts(args.n)}
    work = {k: work[k] for k in args.workloads}
    rows = []
    print(f"# {machine_info()}, {datetime.date.today()}, speculation: "
          f"{'draft ' + args.draft_model if args.draft_model else 'ngram'}")
    print("| weights | workload | streams | tok/s without | tok/s with | ratio | acceptance | accepted/run | same output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q in args.quantization:
        base_llm = LLM(args.model, dtype=args.dtype, quantization=q, kv_cache_memory=0.5, max_model_len=2048,
                       max_num_seqs=max(args.concurrency))
        base = base_llm.engine
        method = SpeculativeConfig("draft", args.num_speculative_tokens, draft_model=args.draft_model) \
            if args.draft_model else SpeculativeConfig("ngram", args.num_speculative_tokens, args.ngram_min, args.ngram_max)
        spec = LLMEngine(replace(base_llm.config, speculative=method), loaded=base.lm)
        run(base, chat_prompts(2), 8, 1)  # warm-up both (kernels, allocator)
        run(spec, chat_prompts(2), 8, 1)
        for name, prompts in work.items():
            for c in args.concurrency:
                a, b = alternating(base, spec, prompts, args.max_tokens, c, args.rounds)
                same = sum(x == y for x, y in zip(a["outputs"], b["outputs"]))
                row = {"quantization": base.lm.quantization, "draft_model": args.draft_model, "workload": name, "streams": c,
                       "without_tok_s": a["tok_s"], "with_tok_s": b["tok_s"], "ratio": b["tok_s"] / a["tok_s"],
                       "acceptance": b["acceptance"], "mean_accepted_per_run": b["mean_accepted_per_run"],
                       "draft_tokens": b["draft_tokens"], "same_outputs": f"{same}/{len(prompts)}"}
                rows.append(row)
                acc = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
                mar = "-" if row["mean_accepted_per_run"] is None else f"{row['mean_accepted_per_run']:.2f}"
                print(f"| {row['quantization']} | {name} | {c} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | "
                      f"{row['ratio']:.2f}x | {acc} | {mar} | {row['same_outputs']} |", flush=True)
        del spec, base, base_llm
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "date": str(datetime.date.today()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
