"""Speculation with and without, the engines stepped in lockstep: for A/B ratios on a shared, loaded host.

benchmarks/spec_decode.py alternates whole slices of prompts between the arms, so a load change that lasts a few
seconds lands on one arm: on a host shared with other jobs its 16-stream ratios move ±15-25% between runs. Here
every arm gets the same prompts at once and the engines take one step each in turn (the order rotating), so
load noise hits the arms alike at the scale of one step; each arm's figure is its tokens over the sum of its own
step times. Arms: `plain` (no speculation), `spec` (prompt lookup with this tree's policy), and with
`--policy-file F` one more, `spec:F`, whose SpecPolicy class is loaded from that file (e.g. another branch's
inferd/engine/spec_decode/policy.py, to compare policies on the same steps). Step-shape histograms show what each
policy chose (rows per decode step).

    OMP_NUM_THREADS=1 python benchmarks/spec_lockstep.py --quantization none --workload chat --concurrency 16 \\
        --slices 3 [--policy-file /work/main/inferd/engine/spec_decode/policy.py]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import time
from dataclasses import replace

from spec_decode import chat_prompts, extraction_prompts, run

from inferd import LLM, SamplingParams
from inferd.config import SpeculativeConfig
from inferd.engine import runner as runner_mod
from inferd.engine.llm_engine import LLMEngine
from inferd.hardware import machine_info

_ROWS: list[tuple[int, bool]] = []  # (tokens, has prefill) of the steps run since the last clear


def _record_shapes() -> None:
    execute = runner_mod.ModelRunner.execute

    def wrapped(self, batch):  # noqa: ANN001, ANN202
        _ROWS.append((int(batch.input_ids.shape[0]), bool(batch.meta.prefills)))
        return execute(self, batch)

    runner_mod.ModelRunner.execute = wrapped


def _with_policy_file(engine: LLMEngine, path: str) -> None:
    """Give the engine a SpecPolicy from another file (an older policy without skip_step/critical is driven as it
    was: never skipping, every sequence's tokens counted in full)."""
    spec = importlib.util.spec_from_file_location("other_policy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pol = mod.SpecPolicy(engine.spec_policy.max_tokens)
    if not hasattr(pol, "skip_step"):
        pol.skip_step = lambda *a, **k: False
    plan = pol.plan
    if "critical" not in plan.__code__.co_varnames:  # the engine passes critical by keyword or 6th positionally
        pol.plan = lambda avail, n, mixed, pass_s=0.0, first=None, critical=None: plan(avail, n, mixed, pass_s, first)
    engine.spec_policy = pol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--workload", choices=["chat", "extraction"], default="chat")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--slices", type=int, default=3, help="batches of `concurrency` prompts, one after another")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--policy-file", default=None, help="one more arm with the SpecPolicy of this file")
    args = ap.parse_args()
    _record_shapes()
    base_llm = LLM(args.model, quantization=args.quantization, kv_cache_memory=0.3, max_model_len=2048,
                   max_num_seqs=args.concurrency)
    cfg = replace(base_llm.config, speculative=SpeculativeConfig("ngram", args.num_speculative_tokens, 2, 4))
    arms = {"plain": base_llm.engine, "spec": LLMEngine(cfg, loaded=base_llm.engine.lm)}
    if args.policy_file:
        other = arms[f"spec:{args.policy_file}"] = LLMEngine(cfg, loaded=base_llm.engine.lm)
        _with_policy_file(other, args.policy_file)
    for e in arms.values():  # the benchmark's warm-up
        run(e, chat_prompts(2), 8, 1)
        e.closed_batch = True  # stepped by hand below: each slice is an offline batch, as run_to_completion runs it
    prompts = (chat_prompts if args.workload == "chat" else extraction_prompts)(args.concurrency * args.slices)
    tok = base_llm.engine.tokenizer
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    secs, toks = collections.Counter(), collections.Counter()
    shapes = {name: collections.Counter() for name in arms}
    turn = 0
    for s in range(0, len(prompts), args.concurrency):
        ids = [tok.encode_chat([{"role": "user", "content": p}], True) for p in prompts[s : s + args.concurrency]]
        for e in arms.values():
            for i, x in enumerate(ids):
                e.add_request(f"{s}-{i}", x, sp)
        while any(e.has_unfinished_requests() for e in arms.values()):
            names = list(arms)
            names = names[turn % len(names) :] + names[: turn % len(names)]
            turn += 1
            for name in names:
                e = arms[name]
                if not e.has_unfinished_requests():
                    continue
                _ROWS.clear()
                t0 = time.perf_counter()
                outs = e.step()
                secs[name] += time.perf_counter() - t0
                for rows, mixed in _ROWS:
                    if not mixed:
                        shapes[name][rows] += 1
                toks[name] += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    print(f"# {machine_info()}; {args.quantization}, {args.workload}, {args.concurrency} streams, {args.slices} slices")
    plain_rate = toks["plain"] / secs["plain"]
    for name, e in arms.items():
        rate = toks[name] / secs[name]
        acc = f", acceptance {e.spec_accepted_tokens}/{e.spec_draft_tokens}" if e.proposer else ""
        print(f"{name}: {sum(shapes[name].values())} decode steps, {toks[name]} tokens, {secs[name]:.2f} s, "
              f"{rate:.1f} tok/s, ratio {rate / plain_rate:.3f}{acc}")
        print(f"  rows per decode step: {sorted(shapes[name].items())}")


if __name__ == "__main__":
    main()
