"""Pruning + distillation of SmolLM2-135M: quality, size and speed of the teacher, a depth-pruned (30 → 20 layers)
and a width-pruned student, each before and after distillation, each also int4 (`inferd quantize`).

Columns: parameters, weight file MB, perplexity on held-out text (benchmarks/data/inference_essay.txt and
inferd/compress/data/heldout.txt; neither is trained on), greedy agreement with the teacher on 20 chat prompts
(mean length of the matching prefix of 32 greedy tokens), single-stream and 16-stream decode tok/s (all models
measured in interleaved rounds in one process, median of the rounds, so a shared CPU's load hits all alike).

    python benchmarks/compress.py [--work DIR] [--distill-minutes 20] [--threads 1] [--stage all|models|quality|speed|table]

Every stage skips work whose output exists in --work (rerun to resume); the distillation logs become the loss and
perplexity-vs-tokens curves in docs/compress_curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESSAY = ROOT / "benchmarks" / "data" / "inference_essay.txt"
HELDOUT = ROOT / "inferd" / "compress" / "data" / "heldout.txt"
PROMPTS = ROOT / "inferd" / "compress" / "data" / "prompts.txt"
TEACHER = "smollm2-135m"
STUDENTS = {"depth": ["--drop-layers", "10"], "width": ["--mlp-ratio", "0.625", "--heads-keep", "6"]}


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def inferd(*args: str) -> list[str]:
    return [sys.executable, "-m", "inferd.cli", *args]


def models(work: Path, minutes: float, threads: int, train_data: list[str]) -> None:
    if not (work / "teacher").is_dir():  # the teacher itself, dense (a prune that removes nothing)
        run(inferd("prune", "--model", TEACHER, "--out", str(work / "teacher"), "--threads", str(threads)))
    for name, flags in STUDENTS.items():
        if not (work / name).is_dir():
            run(inferd("prune", "--model", TEACHER, "--out", str(work / name), *flags, "--threads", str(threads)))
    for name in STUDENTS:
        out = work / f"{name}-distilled"
        if not (out / "model.safetensors").is_file():
            run(inferd("distill", "--teacher", TEACHER, "--student", str(work / name), "--out", str(out),
                       "--generate", "32", *(["--data", *train_data] if train_data else []), "--seq-len", "256",
                       "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-4", "--warmup-steps", "3",
                       "--eval-every", "6", "--checkpoint-every", "20", "--max-minutes", str(minutes),
                       "--threads", str(threads)))
    for d in list(labels(work)):
        if not d.endswith("-int4") and not (work / f"{d}-int4").is_dir():
            run(inferd("quantize", str(work / d), str(work / f"{d}-int4"), "--method", "int4"))


def labels(work: Path) -> list[str]:
    order = ["teacher", "depth", "depth-distilled", "width", "width-distilled"]
    order += sorted(d.name for d in work.iterdir() if d.is_dir() and d.name not in order
                    and not d.name.endswith("-int4"))  # e.g. a longer run resumed into its own directory
    out = []
    for base in order:
        out += [x for x in (base, f"{base}-int4") if (work / x / "config.json").is_file()]
    return out


def params_and_mb(d: Path) -> tuple[float, float]:
    from safetensors import safe_open

    src = d if not d.name.endswith("-int4") else d.with_name(d.name.removesuffix("-int4"))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        n = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return n / 1e6, sum(p.stat().st_size for p in d.glob("*.safetensors")) / 1e6


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _llm(path: Path):
    from inferd import LLM

    q = "none" if not path.name.endswith("-int4") else "auto"
    return LLM(str(path), dtype="bfloat16", quantization=q, kv_cache_memory=0.5, max_model_len=1024,
               max_num_seqs=16, enable_prefix_caching=False)


def chat_prompts(tok) -> list[list[int]]:
    lines = [p.strip() for p in PROMPTS.read_text().splitlines() if p.strip()][:20]
    return [tok.encode_chat([{"role": "user", "content": p}]) for p in lines]


def quality(work: Path, results: dict) -> None:
    from inferd import SamplingParams
    from inferd.quant.perplexity import perplexity

    greedy = SamplingParams(max_tokens=32, temperature=0)
    ref = None
    for label in labels(work):
        if label in results and label != "teacher":
            continue
        llm = _llm(work / label)
        prompts = chat_prompts(llm.tokenizer)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        if label == "teacher":
            ref = outs
            if label in results:
                continue
        ref = ref or results["teacher"]["greedy"]
        agree = []
        for a, b in zip(outs, ref):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            agree.append(n)
        p, mb = params_and_mb(work / label)
        ppl = {name: perplexity(llm.engine, llm.tokenizer.encode(f.read_text()), 512, 256)[0]
               for name, f in (("essay", ESSAY), ("heldout", HELDOUT))}
        results[label] = {"params_m": p, "file_mb": mb, "ppl_essay": ppl["essay"], "ppl_heldout": ppl["heldout"],
                          "agreement": statistics.mean(agree), "greedy": [list(x) for x in outs]}
        print(label, {k: v for k, v in results[label].items() if k != "greedy"}, flush=True)
        save(work, results)
        del llm


def speed(work: Path, results: dict, rounds: int = 3) -> None:
    from inferd import SamplingParams

    llms = {label: _llm(work / label) for label in labels(work)}
    ids = next(iter(llms.values())).tokenizer.encode(ESSAY.read_text())
    one = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    samples: dict[str, dict[str, list[float]]] = {k: {"single": [], "multi": []} for k in llms}
    for _ in range(rounds):
        for label, llm in llms.items():
            llm.generate([ids[:16]], SamplingParams(max_tokens=2))  # warm
            o = llm.generate([ids[:64]], one)[0]
            samples[label]["single"].append(63 / (o.metrics.e2e_s - o.metrics.ttft_s))
            ps = [ids[i * 8: i * 8 + 64] for i in range(16)]
            t = time.perf_counter()
            outs = llm.generate(ps, many)
            samples[label]["multi"].append(sum(len(x.outputs[0].token_ids) for x in outs) / (time.perf_counter() - t))
        print({k: [round(x) for x in v["single"]] for k, v in samples.items()}, flush=True)
    speeds = {label: {"decode_1": statistics.median(s["single"]), "decode_16": statistics.median(s["multi"]),
                      "samples": s} for label, s in samples.items()}
    (work / "speed.json").write_text(json.dumps(speeds, indent=1))
    for label, s in speeds.items():
        results.setdefault(label, {}).update(s)


def save(work: Path, results: dict) -> None:
    """Merged into the file per model (stages may run in separate processes at the same time)."""
    path = work / "results.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for label, r in results.items():
        merged.setdefault(label, {}).update(r)
    path.write_text(json.dumps(merged, indent=1))
    results.update(merged)


def curves(work: Path, png: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lines = []
    teacher_drawn = False
    for log in sorted(work.glob("*-distilled*/train_log.jsonl")):
        name = log.parent.name
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        steps = [r for r in recs if "loss" in r]
        ev = [r for r in recs if "heldout_ppl" in r]
        rec = json.loads((log.parent / "config.json").read_text()).get("inferd_compression", {})
        if rec.get("tool") == "inferd distill" and rec["tokens"] > ev[-1]["tokens"]:  # the final evaluation
            ev.append({"tokens": rec["tokens"], "heldout_ppl": rec["heldout_ppl"]})
        if rec.get("teacher_heldout_ppl") and not teacher_drawn:
            b.axhline(rec["teacher_heldout_ppl"], color="gray", linestyle="--", label="teacher")
            teacher_drawn = True
        a.plot([r["tokens"] for r in steps], [r["kl"] for r in steps], label=f"{name}: KL")
        b.plot([r["tokens"] for r in ev], [r["heldout_ppl"] for r in ev], marker="o", label=name)
        lines.append(f"{name}: " + ", ".join(f"{r['tokens']}: {r['heldout_ppl']:.1f}" for r in ev))
    a.set_xlabel("training tokens"), a.set_ylabel("KL(teacher ‖ student)"), a.legend()
    b.set_xlabel("training tokens"), b.set_ylabel("held-out perplexity (heldout.txt, training forward)")
    b.set_yscale("log"), b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    return "\n".join(lines)


def table(results: dict) -> str:
    rows = ["| model | params (M) | file MB | ppl essay | ppl heldout | greedy agreement (/32) | decode tok/s (1) "
            "| decode tok/s (16) |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "ppl_essay" not in r:
            continue
        sp, mark = r, ""
        if "decode_1" not in r:  # a distilled model has its pruned base's shapes, hence its speed
            base = label.split("-distilled")[0] + ("-int4" if label.endswith("-int4") else "")
            sp, mark = results.get(base, {}), " (=)"
        rows.append(f"| {label} | {r['params_m']:.1f} | {r['file_mb']:.0f} | {r['ppl_essay']:.2f} | "
                    f"{r['ppl_heldout']:.2f} | {r['agreement']:.1f} | {sp.get('decode_1', 0):.1f}{mark} | "
                    f"{sp.get('decode_16', 0):.0f}{mark} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "inferd" / "compress-bench"))
    ap.add_argument("--distill-minutes", type=float, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: with 2 threads on a CPU shared with other jobs, a training step ran 8x slower)")
    ap.add_argument("--data", nargs="*", default=[], help="extra training text for distillation")
    ap.add_argument("--stage", choices=["all", "models", "quality", "speed", "table"], default="all")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from inferd.hardware import machine_info

    torch.set_num_threads(args.threads)

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine_info()}", flush=True)
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    if (work / "speed.json").is_file():
        for label, r in json.loads((work / "speed.json").read_text()).items():
            results.setdefault(label, {}).update(r)
    if args.stage in ("all", "models"):
        models(work, args.distill_minutes, args.threads, args.data)
    if args.stage in ("all", "quality"):
        quality(work, results)
    if args.stage in ("all", "speed"):
        speed(work, results)
    print(table(results))
    print(curves(work, ROOT / "docs" / "compress_curves.png"))


if __name__ == "__main__":
    main()
