"""`inferd simulate`: the cluster simulator from the command line (tables, JSON, PNG plots)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from inferd.errors import InferdError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a cluster of replicas behind the router (no model, no Ray)")
    p.add_argument("--replicas", type=int, nargs="+", default=[100], help="cluster sizes to simulate (10 to 1000+)")
    p.add_argument("--policy", nargs="+", default=["prefix", "round-robin", "least-loaded"],
                   help="routing policies to compare")
    p.add_argument("--requests-per-replica", type=float, default=2.0,
                   help="offered load: requests/s per replica of each --replicas size")
    p.add_argument("--requests-per-s", type=float, default=None, help="absolute offered load (overrides the above)")
    p.add_argument("--arrival", choices=["poisson", "bursty"], default="poisson",
                   help="conversation start process (bursty: gamma gaps with --burst-cv)")
    p.add_argument("--burst-cv", type=float, default=3.0)
    p.add_argument("--system-prompts", type=int, default=50, help="distinct shared system prompts (Zipf popularity)")
    p.add_argument("--mean-turns", type=float, default=3.0, help="turns per conversation (geometric mean)")
    p.add_argument("--think-s", type=float, default=8.0, help="mean pause between a reply and the next turn")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals simulated")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of arrivals left out of the statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imbalance-abs", type=int, default=8,
                   help="prefix routing: ongoing requests above the power-of-two choice before falling back")
    p.add_argument("--imbalance-rel", type=float, default=1.5, help="... and this many times its load")
    p.add_argument("--cache-tokens", type=int, default=65536, help="prefix-cache capacity per replica, tokens")
    p.add_argument("--decode-points", default=None, metavar="N:TOKS,...",
                   help="refit the step time from (sequences:output tok/s) pairs of `inferd bench offline` "
                        "(default: the figures in docs/benchmarks.md)")
    p.add_argument("--prefill-tok-s", type=float, default=None, help="prefill speed of one replica, tokens/s")
    p.add_argument("--request-overhead-ms", type=float, default=0.0, metavar="MS",
                   help="fixed latency from a request's arrival to its replica's queue (HTTP and routing hops), "
                        "added to every TTFT")
    p.add_argument("--step-jitter", default=None, metavar="F,F,...",
                   help="measured step-time variability: multiplicative factors, one drawn (seeded) per prefill "
                        "step or decode stretch (benchmarks/sim_validate.py prints a calibration's)")
    p.add_argument("--slo-ttft-p99", type=float, default=None, metavar="S",
                   help="also find the replicas needed for TTFT p99 <= S seconds at each load (bisection)")
    p.add_argument("--slo-tpot-p99", type=float, default=None, metavar="S",
                   help="with --slo-ttft-p99: also require TPOT p99 <= S seconds")
    p.add_argument("--price-per-hour", type=float, default=0.10, help="USD per replica-hour, for cost per 1M tokens")
    p.add_argument("--json", default=None, help="write every result to this file")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots to this folder (needs matplotlib)")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from inferd.cluster.router import RouterConfig
    from inferd.cluster.service_model import ServiceModel, fit_decode
    from inferd.cluster.simulate import replicas_for_slo, simulate
    from inferd.cluster.workload import WorkloadConfig

    if any(n < 1 for n in args.replicas):
        raise InferdError("--replicas needs positive counts")
    svc = ServiceModel(cache_tokens=args.cache_tokens)
    try:
        if args.decode_points:
            pts = [(int(a), float(b)) for a, b in (p.split(":") for p in args.decode_points.split(","))]
            base, per_seq = fit_decode(pts)
            svc = replace(svc, base_s=base, per_seq_s=per_seq)
        if args.prefill_tok_s:
            svc = replace(svc, per_prefill_token_s=1.0 / args.prefill_tok_s)
        if args.request_overhead_ms < 0:
            raise ValueError("--request-overhead-ms must be >= 0")
        svc = replace(svc, request_overhead_s=args.request_overhead_ms / 1000)
        if args.step_jitter:
            try:
                factors = tuple(float(x) for x in args.step_jitter.split(","))
            except ValueError:
                raise ValueError(f"--step-jitter needs comma-separated numbers, got {args.step_jitter!r}") from None
            if not all(f > 0 for f in factors):
                raise ValueError("--step-jitter factors must be positive")
            svc = replace(svc, step_jitter=factors)
        routers = {p: RouterConfig(policy=p, imbalance_abs=args.imbalance_abs, imbalance_rel=args.imbalance_rel,
                                   seed=args.seed) for p in args.policy}
    except ValueError as exc:
        raise InferdError(str(exc)) from exc
    print(f"service model: step = {svc.base_s * 1e3:.2f} ms + {svc.per_seq_s * 1e3:.3f} ms x running seqs + "
          f"{svc.per_prefill_token_s * 1e3:.3f} ms x prefill tokens (budget {svc.token_budget}, "
          f"{svc.max_num_seqs} seqs, {svc.cache_tokens} cached tokens)", file=sys.stderr)
    rows: list[dict] = []
    curves: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for n in args.replicas:
        rps = args.requests_per_s or args.requests_per_replica * n
        try:
            wl = WorkloadConfig(conversations_per_s=rps / args.mean_turns, system_prompts=args.system_prompts,
                                mean_turns=args.mean_turns, think_s=args.think_s, arrival=args.arrival,
                                burst_cv=args.burst_cv, seed=args.seed)
        except ValueError as exc:
            raise InferdError(str(exc)) from exc
        for policy, rc in routers.items():
            points = curves.setdefault((n, policy), [])

            def run(m: int, rc=rc, wl=wl, points=points):
                res = simulate(m, wl, rc, svc, args.duration, args.warmup, args.price_per_hour)
                points.append((m, res.ttft_p99_s))
                return res

            row = run(n).row()
            if args.slo_ttft_p99 is not None:
                need = replicas_for_slo(run, args.slo_ttft_p99, max(1, n // 4), 2 * n, tpot_p99_s=args.slo_tpot_p99)
                row["replicas_for_slo"] = need
                row["cost_per_1m_out_at_slo"] = row["cost_per_1m_out"] * need / n if need else None
                row["slo_probes"] = sorted(set(points))  # (replicas, TTFT p99 s) of every simulated size
            rows.append(row)
            print(_line(row), flush=True)
    print(_markdown(rows, args.slo_ttft_p99))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "func"},
                                               "service_model": svc.__dict__, "results": rows}, indent=1))
    if args.plot:
        _plot(Path(args.plot), rows, curves, args.slo_ttft_p99)
    return 0


def _line(r: dict) -> str:
    return (f"{r['replicas']} replicas, {r['policy']}: {r['requests']} requests, hit {r['hit_rate']:.2f}, "
            f"TTFT p50/p99 {r['ttft_p50_s'] * 1e3:.0f}/{r['ttft_p99_s'] * 1e3:.0f} ms, TPOT p50/p99 "
            f"{r['tpot_p50_s'] * 1e3:.1f}/{r['tpot_p99_s'] * 1e3:.1f} ms")


def _markdown(rows: list[dict], slo: float | None) -> str:
    head = ["replicas", "req/s", "policy", "prefix hit rate", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
            "TPOT p99 ms", "out tok/s", "$/1M out"]
    if slo is not None:
        head += [f"replicas for the SLO (TTFT p99 <= {slo:g} s)", "$/1M out at that size"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["replicas"]), f"{r['requests_per_s']:.0f}", r["policy"], f"{r['hit_rate']:.2f}",
                 f"{r['ttft_p50_s'] * 1e3:.0f}", f"{r['ttft_p99_s'] * 1e3:.0f}", f"{r['tpot_p50_s'] * 1e3:.1f}",
                 f"{r['tpot_p99_s'] * 1e3:.1f}", f"{r['out_tok_s']:.0f}", f"{r['cost_per_1m_out']:.3f}"]
        if slo is not None:
            need = r.get("replicas_for_slo")
            cells += [str(need) if need else "> 2x", f"{r['cost_per_1m_out_at_slo']:.3f}" if need else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(out: Path, rows: list[dict], curves: dict, slo: float | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InferdError("--plot needs matplotlib (pip install matplotlib)") from exc
    out.mkdir(parents=True, exist_ok=True)
    for n in sorted({r["replicas"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (m, policy), pts in curves.items():
            if m != n:
                continue
            pts = sorted(set(pts))
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=policy)
        if slo is not None:
            ax.axhline(slo * 1e3, color="grey", linestyle="--", label=f"SLO {slo:g} s")
        ax.set_xlabel("replicas")
        ax.set_ylabel("TTFT p99 (ms)")
        ax.set_yscale("log")
        ax.set_title(f"load sized for {n} replicas")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"ttft_p99_vs_replicas_{n}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['replicas']}\n{r['policy']}" for r in rows]
    ax.bar(range(len(rows)), [r["hit_rate"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("prefix-cache hit rate (prompt tokens)")
    fig.tight_layout()
    fig.savefig(out / "hit_rate.png", dpi=100)
    plt.close(fig)
    print(f"plots in {out}/", file=sys.stderr)
