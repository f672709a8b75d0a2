"""`inferd prune` and `inferd distill`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inferd.compress.distill import DistillConfig
from inferd.compress.prune import IMPORTANCE, PruneConfig
from inferd.errors import InferdError

SAVE_DTYPES = ("bfloat16", "float32")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove layers, MLP channels or attention heads, ranked on calibration text")
    p.add_argument("--model", default="smollm2-135m", help="known model name, .gguf file or HF directory")
    p.add_argument("--out", required=True, help="output directory (loads with --model OUT)")
    p.add_argument("--drop-layers", type=int, default=PruneConfig.drop_layers, help="decoder layers to remove")
    p.add_argument("--mlp-ratio", type=float, default=PruneConfig.mlp_ratio,
                   help="fraction of MLP channels each layer keeps (rounded down to a multiple of 32)")
    p.add_argument("--heads-keep", type=int, default=None,
                   help="query heads each layer keeps (a multiple of the KV heads; default all)")
    p.add_argument("--importance", choices=IMPORTANCE, default=PruneConfig.importance,
                   help="layer score: angular distance in→out, or loss increase when the layer is skipped")
    p.add_argument("--calib-file", default=None, help="calibration text (default: the text shipped in "
                   "inferd/compress/data/calibration.txt)")
    p.add_argument("--calib-tokens", type=int, default=PruneConfig.calib_tokens, help="calibration tokens used")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="bfloat16", help="dtype of the written weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=cmd_prune)

    d = sub.add_parser("distill", help="train a (pruned) student to match a teacher's next-token distributions")
    d.add_argument("--teacher", default="smollm2-135m", help="known model name, .gguf file or HF directory")
    d.add_argument("--student", required=True, help="student model (e.g. an `inferd prune` output directory)")
    d.add_argument("--out", required=True, help="output directory: the trained model, checkpoint.pt, "
                   "train_log.jsonl")
    d.add_argument("--data", nargs="+", default=None, metavar="FILE", help="UTF-8 training text files")
    d.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also train on N replies the teacher samples from seeded prompts (cached in OUT)")
    d.add_argument("--gen-tokens", type=int, default=None, help="tokens per generated reply (default --seq-len)")
    d.add_argument("--eval-file", default=None, help="held-out text for perplexity (default: the text shipped "
                   "in inferd/compress/data/heldout.txt)")
    c = DistillConfig
    d.add_argument("--seq-len", type=int, default=c.seq_len, help="tokens per training sequence")
    d.add_argument("--batch-size", type=int, default=c.batch_size, help="sequences per micro-batch")
    d.add_argument("--grad-accum", type=int, default=c.grad_accum, help="micro-batches per optimizer step")
    d.add_argument("--lr", type=float, default=c.lr, help="peak learning rate (AdamW)")
    d.add_argument("--min-lr-ratio", type=float, default=c.min_lr_ratio, help="final lr as a fraction of --lr")
    d.add_argument("--warmup-steps", type=int, default=c.warmup_steps, help="linear warmup steps")
    d.add_argument("--weight-decay", type=float, default=c.weight_decay, help="AdamW weight decay (matrices)")
    d.add_argument("--clip", type=float, default=c.clip, help="gradient norm clip")
    d.add_argument("--temperature", type=float, default=c.temperature, help="distillation temperature τ")
    d.add_argument("--top-k", type=int, default=c.top_k, help="KL over the teacher's top-k tokens (0: all)")
    d.add_argument("--ce-weight", type=float, default=c.ce_weight, help="weight of the next-token CE term")
    d.add_argument("--max-steps", type=int, default=None, help="budget: optimizer steps")
    d.add_argument("--max-tokens", type=int, default=None, help="budget: training tokens")
    d.add_argument("--max-minutes", type=float, default=None, help="budget: wall-clock minutes")
    d.add_argument("--checkpoint-every", type=int, default=c.checkpoint_every, help="steps between checkpoints")
    d.add_argument("--eval-every", type=int, default=c.eval_every,
                   help="steps between held-out perplexity evaluations (0: start and end only)")
    d.add_argument("--seed", type=int, default=c.seed)
    d.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on where the CPU has native bf16 dot products)")
    d.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (less memory)")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    d.add_argument("--save-dtype", choices=SAVE_DTYPES, default="bfloat16", help="dtype of the written weights")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    d.set_defaults(func=cmd_distill)


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise InferdError("--threads must be ≥ 1")
        torch.set_num_threads(n)


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from inferd.compress import data, prune
    from inferd.compress.io import load_dense, save_model

    _threads(args.threads)
    cfg = PruneConfig(args.drop_layers, args.mlp_ratio, args.heads_keep, args.importance, args.calib_tokens)
    if cfg.calib_tokens < 2:
        raise InferdError("--calib-tokens must be ≥ 2")
    text = data.read_texts([args.calib_file or data.CALIBRATION])[0]
    lm = load_dense(args.model)
    prune.validate(cfg, lm.model)
    batches = prune.calibration_batches(lm.tokenizer.encode(text), cfg.seq_len, cfg.calib_tokens)
    small, report = prune.prune(lm.model, cfg, batches)
    if cfg.drop_layers:
        print(report.ranking(cfg.importance))
    if cfg.heads_keep and cfg.heads_keep < lm.config.num_heads:
        print("query heads kept per layer (ranked by attention output norm, per KV group): "
              + "; ".join(f"{j}: {hs}" for j, hs in enumerate(report.kept_heads)))
    print(prune.summary(cfg, lm.model, small, report))
    dtype = getattr(torch, args.save_dtype)
    dst = save_model(small, lm.tokenizer, args.out, prune.recipe(cfg, str(lm.path), report), dtype)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst} ({size / 1e6:.1f} MB, {args.save_dtype})")
    return 0


def _rows(args: argparse.Namespace, cfg: DistillConfig, tok, out: Path):
    from inferd.compress import data

    docs: list[list[int]] = []
    if args.data:
        docs += data.tokenize_docs(tok, data.read_texts(args.data))
    if args.generate:
        if args.generate < 0:
            raise InferdError("--generate must be ≥ 0")
        gen_tokens = args.gen_tokens or cfg.seq_len
        key = {"teacher": args.teacher, "n": args.generate, "seed": cfg.seed, "tokens": gen_tokens}
        cache = out / "generated.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else None
        if cached and cached.get("key") == key:
            gen = cached["docs"]
            print(f"reusing {len(gen)} generated sequences from {cache}", file=sys.stderr)
        else:
            gen = data.generate_docs(args.teacher, args.generate, gen_tokens, cfg.seed)
            out.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "docs": gen}))
        docs += gen
    if not docs:
        docs = data.tokenize_docs(tok, data.read_texts([data.CALIBRATION]))
        print("no --data or --generate: training on the shipped calibration text only (a demo; use "
              "--generate N or --data for real runs)", file=sys.stderr)
    eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
    return data.pack(docs, cfg.seq_len, eos)


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from inferd.compress import data, forward
    from inferd.compress.distill import train
    from inferd.compress.io import load_dense, param_count, save_model
    from inferd.ops.kernels import get_kernels

    _threads(args.threads)
    k = get_kernels()
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and (k.bf16_dot or k.tier == "avx512_amx"))
    cfg = DistillConfig(args.seq_len, args.batch_size, args.grad_accum, args.lr, args.min_lr_ratio,
                        args.warmup_steps, args.weight_decay, args.clip, args.temperature, args.top_k,
                        args.ce_weight, args.max_steps, args.max_tokens, args.max_minutes, args.checkpoint_every,
                        args.eval_every, args.seed, bf16, args.grad_checkpoint)
    cfg.validate()
    out = Path(args.out)
    eval_text = data.read_texts([args.eval_file or data.HELDOUT])[0]
    if args.data:
        data.read_texts(args.data)  # fail on a missing file before any model is loaded
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise InferdError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
    teacher = load_dense(args.teacher, max(2048, cfg.seq_len))
    student = load_dense(args.student, max(2048, cfg.seq_len))
    tv, sv = teacher.tokenizer.hf.get_vocab(), student.tokenizer.hf.get_vocab()
    if teacher.config.vocab_size != student.config.vocab_size or tv != sv:
        raise InferdError(f"the student's vocabulary ({student.config.vocab_size} tokens) differs from the "
                          f"teacher's ({teacher.config.vocab_size}): distillation needs the same tokenizer")
    rows = _rows(args, cfg, teacher.tokenizer, out)
    eval_ids = teacher.tokenizer.encode(eval_text)
    ctx = min(512, cfg.seq_len * 2)

    def evaluate() -> float:
        student.model.eval()
        return forward.perplexity(lambda x: forward.logits(student.model, x), eval_ids, ctx, ctx // 2)

    t_ppl = forward.perplexity(lambda x: forward.logits(teacher.model, x), eval_ids, ctx, ctx // 2)
    print(f"teacher {args.teacher}: {param_count(teacher.model) / 1e6:.1f}M parameters, held-out perplexity "
          f"{t_ppl:.3f}; student {args.student}: {param_count(student.model) / 1e6:.1f}M parameters; "
          f"{rows.shape[0]} sequences × {cfg.seq_len} tokens; bf16 autocast {'on' if bf16 else 'off'}",
          file=sys.stderr)
    records = train(teacher.model, student.model, rows, cfg, out, args.resume, evaluate)
    before = next((r["heldout_ppl"] for r in records if r["step"] == 0), None)
    after = evaluate()
    steps = [r for r in records if "loss" in r]
    recipe = {"tool": "inferd distill", "teacher": args.teacher, "student": args.student,
              "steps": steps[-1]["step"] if steps else 0, "tokens": steps[-1]["tokens"] if steps else 0,
              "heldout_ppl": round(after, 4), "teacher_heldout_ppl": round(t_ppl, 4),
              "config": {k: v for k, v in cfg.__dict__.items()}}
    save_model(student.model, student.tokenizer, out, recipe, getattr(torch, args.save_dtype))
    last = f", last loss {steps[-1]['loss']:.4f} (KL {steps[-1]['kl']:.4f})" if steps else ""
    print(f"wrote {out}: {recipe['steps']} steps, {recipe['tokens']} tokens{last}; held-out perplexity "
          + (f"{before:.3f} → " if before is not None else "") + f"{after:.3f} (teacher {t_ppl:.3f})")
    return 0
