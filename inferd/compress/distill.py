"""Knowledge distillation: train a student to match a teacher's next-token distributions.

loss = τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) + ce_weight · CE(s, next token), per position, averaged. With
`top_k` both distributions are truncated to the teacher's k largest logits and renormalised there (the KL of the
truncated distributions; the CE term keeps the student's mass outside them in check). AdamW, linear warmup then cosine decay to `min_lr_ratio`, gradient clipping, gradient accumulation.
The run is a pure function of (teacher, student, data, config, seed) when the budget is steps or tokens (a
`max_minutes` budget also shapes the schedule by elapsed time). Teacher logits are computed online (teacher
forward under no_grad): see the README for the measurement behind that choice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from inferd.compress.forward import logits
from inferd.errors import InferdError
from inferd.models.llama import LlamaForCausalLM

CKPT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class DistillConfig:
    seq_len: int = 256
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0: KL over the whole vocabulary
    ce_weight: float = 0.1
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 50
    eval_every: int = 0  # steps between held-out perplexity evaluations (0: only at the start and the end)
    seed: int = 0
    bf16: bool = False  # autocast to bf16 (the CLI turns it on where the CPU has native bf16 dot products)
    grad_checkpoint: bool = False

    def validate(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1 or self.grad_accum < 1:
            raise InferdError("--seq-len must be ≥ 2, --batch-size and --grad-accum ≥ 1")
        if self.lr <= 0 or self.temperature <= 0 or self.ce_weight < 0 or self.top_k < 0:
            raise InferdError("--lr and --temperature must be > 0, --ce-weight and --top-k ≥ 0")
        for name in ("max_steps", "max_tokens", "max_minutes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise InferdError(f"--{name.replace('_', '-')} must be > 0")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


def distill_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, ids: torch.Tensor,
                 cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for logits (B, T, V) of student and teacher on ids (B, T)."""
    tau = cfg.temperature
    s = s_logits.float() / tau
    t = t_logits.float() / tau
    if cfg.top_k:
        tv, ti = t.topk(cfg.top_k, dim=-1)  # (B, T, k)
        t_logp = torch.log_softmax(tv, dim=-1)
        s_k = torch.log_softmax(s.gather(-1, ti), dim=-1)  # the student renormalised over the same tokens
        kl = (t_logp.exp() * (t_logp - s_k)).sum(-1).mean()
    else:
        t_logp = torch.log_softmax(t, dim=-1)
        kl = F.kl_div(torch.log_softmax(s, dim=-1), t_logp, log_target=True, reduction="none").sum(-1).mean()
    kl = kl * tau * tau
    ce = F.cross_entropy(s_logits[:, :-1].float().reshape(-1, s_logits.shape[-1]), ids[:, 1:].reshape(-1))
    return kl + cfg.ce_weight * ce, kl.detach(), ce.detach()


def lr_at(cfg: DistillConfig, step: int, total: int | None, elapsed_s: float) -> float:
    """Linear warmup, then cosine decay over the larger of step / total and elapsed / max_minutes."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = 0.0
    if total:
        frac = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    if cfg.max_minutes:
        frac = max(frac, elapsed_s / (cfg.max_minutes * 60))
    frac = min(max(frac, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def total_steps(cfg: DistillConfig, n_rows: int) -> int | None:
    """Steps the budget allows: max_steps, else max_tokens, else one pass over the data unless only a time
    budget is given (then None: the run stops on time)."""
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_tokens:
        return max(1, math.ceil(cfg.max_tokens / cfg.tokens_per_step))
    if cfg.max_minutes:
        return None
    return max(1, n_rows // (cfg.batch_size * cfg.grad_accum))


def batch_rows(cfg: DistillConfig, n_rows: int, step: int, micro: int) -> torch.Tensor:
    """Row indices of one micro-batch: epochs of seeded permutations, read in order (so a resumed run
    reads exactly what an uninterrupted one would)."""
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    idx = []
    for k in range(start, start + cfg.batch_size):
        epoch, pos = divmod(k, n_rows)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        idx.append(int(torch.randperm(n_rows, generator=g)[pos]))
    return torch.tensor(idx)


def data_digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def _autocast(cfg: DistillConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


def save_checkpoint(out: Path, student: LlamaForCausalLM, opt: torch.optim.Optimizer, state: TrainState,
                    cfg: DistillConfig, digest: str) -> None:
    tmp = out / (CKPT + ".tmp")
    torch.save({"student": student.state_dict(), "optim": opt.state_dict(), "state": asdict(state),
                "config": asdict(cfg), "data": digest}, tmp)
    os.replace(tmp, out / CKPT)  # atomic: a crash mid-write leaves the previous checkpoint


def load_checkpoint(out: Path, student: LlamaForCausalLM, opt: torch.optim.Optimizer, cfg: DistillConfig,
                    digest: str) -> TrainState:
    path = out / CKPT
    if not path.is_file():
        raise InferdError(f"--resume: no checkpoint at {path}")
    ck = torch.load(path, weights_only=True)
    for k in ("seq_len", "batch_size", "grad_accum", "seed", "top_k", "temperature", "ce_weight"):
        if ck["config"].get(k) != getattr(cfg, k):
            raise InferdError(f"--resume: {k} was {ck['config'].get(k)} in the checkpoint, now {getattr(cfg, k)}")
    if ck["data"] != digest:
        raise InferdError("--resume: the training data differs from the checkpoint's")
    student.load_state_dict(ck["student"])
    opt.load_state_dict(ck["optim"])
    return TrainState(**ck["state"])


def make_optimizer(student: LlamaForCausalLM, cfg: DistillConfig) -> torch.optim.AdamW:
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in student.named_parameters() if p.dim() < 2]  # norms: no weight decay
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             foreach=True)


def train(teacher: LlamaForCausalLM, student: LlamaForCausalLM, rows: torch.Tensor, cfg: DistillConfig,
          out: Path, resume: bool = False, evaluate: Callable[[], float] | None = None,
          progress: bool = True) -> list[dict]:
    """Trains `student` in place on (N, seq_len) token rows; writes checkpoints and a JSON-lines log to `out`.
    Returns the log records of this call."""
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher.requires_grad_(False).eval()
    student.requires_grad_(True).train()
    opt = make_optimizer(student, cfg)
    digest = data_digest(rows)
    state = load_checkpoint(out, student, opt, cfg, digest) if resume else TrainState()
    total = total_steps(cfg, rows.shape[0])
    records: list[dict] = []
    log = (out / LOG).open("a" if resume else "w")

    def record(rec: dict) -> None:
        records.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    if evaluate is not None and state.step == 0:
        record({"step": 0, "tokens": 0, "heldout_ppl": evaluate()})
    from tqdm import tqdm

    bar = tqdm(total=total, initial=state.step, desc="distill", unit="step", file=sys.stderr, disable=not progress)
    t_start = time.perf_counter() - state.elapsed_s
    try:
        while True:
            elapsed = time.perf_counter() - t_start
            if (total is not None and state.step >= total) or (cfg.max_tokens and state.tokens >= cfg.max_tokens) \
                    or (cfg.max_minutes and elapsed >= cfg.max_minutes * 60):
                break
            lr = lr_at(cfg, state.step, total, elapsed)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            kl_sum = ce_sum = loss_sum = teacher_s = 0.0
            for micro in range(cfg.grad_accum):
                ids = rows[batch_rows(cfg, rows.shape[0], state.step, micro)]  # (B, T)
                with _autocast(cfg):
                    t1 = time.perf_counter()
                    with torch.no_grad():
                        t_logits = logits(teacher, ids)
                    teacher_s += time.perf_counter() - t1
                    s_logits = logits(student, ids, checkpoint=cfg.grad_checkpoint)
                loss, kl, ce = distill_loss(s_logits, t_logits, ids, cfg)
                (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
                kl_sum += float(kl) / cfg.grad_accum
                ce_sum += float(ce) / cfg.grad_accum
            gnorm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += cfg.tokens_per_step
            state.elapsed_s = time.perf_counter() - t_start
            step_s = time.perf_counter() - t0
            tps = cfg.tokens_per_step / step_s
            rec = {"step": state.step, "tokens": state.tokens, "loss": round(loss_sum, 5), "kl": round(kl_sum, 5),
                   "ce": round(ce_sum, 5), "lr": lr, "grad_norm": round(gnorm, 4), "tok_s": round(tps, 1),
                   "teacher_frac": round(teacher_s / step_s, 3), "elapsed_s": round(state.elapsed_s, 1)}
            if evaluate is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                rec["heldout_ppl"] = evaluate()
                student.train()
            record(rec)
            bar.set_postfix(loss=f"{loss_sum:.3f}", kl=f"{kl_sum:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(out, student, opt, state, cfg, digest)
    finally:
        bar.close()
        save_checkpoint(out, student, opt, state, cfg, digest)
        log.close()
    student.requires_grad_(False).eval()
    return records
