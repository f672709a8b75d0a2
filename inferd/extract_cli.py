"""`inferd extract`: documents → one JSON object each, enforced by a JSON schema (structured outputs).

Every document becomes one chat request constrained by the schema; all of them go through one engine (batched
by its scheduler), with a progress bar. The output has one line per document, in input order: {"file", "data"}
on success, {"file", "error"} on failure (unreadable file, prompt too long, output cut by --max-tokens). One bad
document never stops the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from inferd.errors import InferdError

INSTRUCTION = ("Extract the information from the user's document as JSON matching this JSON schema. Use only "
               "what the document says.\nSchema: {schema}")


def register(sub: argparse._SubParsersAction) -> None:
    from inferd.cli_args import add_engine_args

    p = sub.add_parser("extract", help="extract one schema-valid JSON object per document")
    p.add_argument("docs", nargs="+", help="document files (text)")
    p.add_argument("--schema", required=True, help="JSON schema file the output must match")
    p.add_argument("--output", "-o", default=None, help="JSON lines file (default: standard output)")
    p.add_argument("--instruction", default=INSTRUCTION,
                   help="system message; {schema} is replaced by the schema (default: a short extraction prompt)")
    p.add_argument("--max-tokens", type=int, default=512, help="output tokens per document")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--lenient", action="store_true",
                   help="ignore schema keywords the engine cannot enforce (default: refuse the schema)")
    p.add_argument("--price-per-hour", type=float, default=0.0, help="machine price, USD/hour, for the cost line")
    add_engine_args(p)
    p.set_defaults(func=cmd_extract)


def _prompt(llm: Any, instruction: str, text: str) -> str | list[int]:
    if llm.tokenizer.chat_template is None:
        return f"{instruction}\n\nDocument:\n{text}\n\nJSON:"
    return llm.tokenizer.encode_chat([{"role": "system", "content": instruction}, {"role": "user", "content": text}])


def cmd_extract(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inferd.cli_args import load_llm
    from inferd.sampling_params import SamplingParams
    from inferd.structured import StructuredOutputsParams

    try:
        schema = json.loads(Path(args.schema).read_text())
    except (OSError, ValueError) as exc:
        raise InferdError(f"cannot read the schema {args.schema}: {exc}") from exc
    spec = StructuredOutputsParams(json=schema, strict=not args.lenient, param="--schema")
    llm = load_llm(args)
    eng = llm.engine
    eng.grammar_compiler().compile(spec)  # a bad schema fails here, once, before any document runs
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, structured_outputs=spec)
    instruction = args.instruction.replace("{schema}", json.dumps(schema))
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for i, doc in enumerate(args.docs):
        rid = str(i)
        try:
            eng.add_request(rid, _prompt(llm, instruction, Path(doc).read_text(errors="replace")), params)
        except (OSError, InferdError) as exc:
            results[rid] = {"file": doc, "error": str(exc)}
    compute_s = 0.0
    with tqdm(total=len(args.docs), desc="extract", unit="doc", file=sys.stderr) as bar:
        bar.update(len(results))
        while eng.has_unfinished_requests():
            for ro in eng.step():
                if not ro.finished:
                    continue
                co, doc = ro.outputs[0], args.docs[int(ro.request_id)]
                compute_s += ro.metrics.compute_s
                if co.finish_reason == "length":
                    results[ro.request_id] = {"file": doc, "error": f"output cut at --max-tokens {args.max_tokens}"}
                elif co.error or co.finish_reason != "stop":
                    results[ro.request_id] = {"file": doc, "error": co.error or f"finished: {co.finish_reason}"}
                else:
                    try:
                        results[ro.request_id] = {"file": doc, "data": json.loads(co.text)}
                    except ValueError as exc:
                        results[ro.request_id] = {"file": doc, "error": f"output is not JSON: {exc}"}
                bar.update(1)
    wall = time.perf_counter() - t0
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for i in range(len(args.docs)):
            out.write(json.dumps(results[str(i)], ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    failed = sum("error" in r for r in results.values())
    n = len(args.docs)
    cost = compute_s * args.price_per_hour / 3600
    print(f"extracted {n - failed}/{n} documents ({failed} failed) in {wall:.1f} s: {n / wall:.2f} docs/s, "
          f"{compute_s:.1f} compute s" + (f", ${cost / n * 1000:.4f} per 1000 docs" if args.price_per_hour else ""),
          file=sys.stderr)
    return 1 if failed == n else 0
