"""Tables, results.json and PNG plots for a benchmark sweep."""

from __future__ import annotations

import json
from pathlib import Path


def fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(levels: list[dict]) -> str:
    head = ("| conc | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | "
            "E2E p50/p90/p99 ms | goodput req/s | errors | $/1M out |")
    lines = [head, "|" + "---|" * 10]
    for lv in levels:
        s = lv["summary"]

        def p3(k: str, s: dict = s) -> str:
            return "/".join(fmt(s[k][f"p{p}"], 0) for p in (50, 90, 99))

        lines.append(
            f"| {lv['concurrency']} | {s['request_throughput']:.2f} | {s['output_throughput']:.1f} | {p3('ttft_ms')} | "
            f"{p3('tpot_ms')} | {p3('itl_ms')} | {p3('e2e_ms')} | {s['goodput']:.2f} | {s['errors']} | "
            f"{fmt(s['cost_per_1m_output_tokens_usd'], 3)} |")
    return "\n".join(lines)


def write_results(out_dir: Path, config: dict, levels: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps({"config": config, "levels": levels}, indent=2))
    return path


def plot(out_dir: Path, levels: list[dict], label: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [lv["concurrency"] for lv in levels]
    s = [lv["summary"] for lv in levels]
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=90)
    ax.plot(conc, [x["output_throughput"] for x in s], marker="o", label=label or None)
    ax.set(xlabel="concurrency", ylabel="output tok/s", title="Throughput vs concurrency", xscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=90)
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        for p in (50, 90, 99):
            ax.plot(conc, [x[key][f"p{p}"] or 0 for x in s], marker="o", label=f"p{p}")
        ax.set(xlabel="concurrency", ylabel="ms", title=title, xscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "latency.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=90)
    ax.plot([x["output_throughput"] for x in s], [x["tpot_ms"]["p50"] or 0 for x in s], marker="o")
    for c, x in zip(conc, s):
        ax.annotate(str(c), (x["output_throughput"], x["tpot_ms"]["p50"] or 0))
    ax.set(xlabel="output tok/s", ylabel="TPOT p50 ms", title="Latency vs throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "latency_throughput.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def compare(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Side-by-side ratios (b / a) per concurrency level present in both."""
    by_a = {lv["concurrency"]: lv["summary"] for lv in a["levels"]}
    by_b = {lv["concurrency"]: lv["summary"] for lv in b["levels"]}
    rows = [f"| conc | out tok/s {name_a} | out tok/s {name_b} | ratio | TTFT p50 {name_a} | TTFT p50 {name_b} | "
            f"ratio | TPOT p50 {name_a} | TPOT p50 {name_b} | ratio |", "|" + "---|" * 10]

    def ratio(x: float | None, y: float | None) -> str:
        return "-" if not x or y is None else f"{y / x:.2f}x"

    for c in sorted(set(by_a) & set(by_b)):
        sa, sb = by_a[c], by_b[c]
        rows.append(
            f"| {c} | {sa['output_throughput']:.1f} | {sb['output_throughput']:.1f} | "
            f"{ratio(sa['output_throughput'], sb['output_throughput'])} | {fmt(sa['ttft_ms']['p50'], 0)} | "
            f"{fmt(sb['ttft_ms']['p50'], 0)} | {ratio(sa['ttft_ms']['p50'], sb['ttft_ms']['p50'])} | "
            f"{fmt(sa['tpot_ms']['p50'])} | {fmt(sb['tpot_ms']['p50'])} | {ratio(sa['tpot_ms']['p50'], sb['tpot_ms']['p50'])} |")
    return "\n".join(rows)
