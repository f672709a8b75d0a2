"""Benchmark metric definitions (as vLLM's `vllm bench serve`).

Per request: TTFT = first content chunk − send; E2E = last chunk − send; ITL = gaps between consecutive
content chunks; TPOT = (E2E − TTFT) / (output tokens − 1), defined when a request produced > 1 token.
Per run: throughput = output tokens / duration; request throughput = successful requests / duration;
goodput = successful requests meeting every SLO / duration; cost per 1M output tokens =
price_per_hour × duration_h / output tokens × 1e6.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    server_cost_usd: float | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


PERCENTILES = (50, 90, 99)


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    arr = np.asarray(values, dtype=np.float64) * 1000.0  # ms
    out: dict[str, float | None] = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def summarize(results: list[RequestResult], duration_s: float, price_per_hour: float = 0.0,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def meets(r: RequestResult) -> bool:
        if slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > slo_ttft_ms):
            return False
        tpot = r.tpot_s
        if slo_tpot_ms is not None and tpot is not None and tpot * 1000 > slo_tpot_ms:
            return False
        return True

    good = [r for r in ok if meets(r)]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "error").split(":")[0][:80]
            errors[key] = errors.get(key, 0) + 1
    server_costs = [r.server_cost_usd for r in ok if r.server_cost_usd is not None]
    return {
        "num_requests": len(results),
        "successful": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s else 0.0,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "goodput": len(good) / duration_s if duration_s else 0.0,
        "goodput_fraction": len(good) / len(results) if results else 0.0,
        "ttft_ms": _pct([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _pct([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": _pct([g for r in ok for g in r.itl_s]),
        "e2e_ms": _pct([r.e2e_s for r in ok if r.e2e_s is not None]),
        "cost_per_1m_output_tokens_usd": (price_per_hour * duration_s / 3600 / out_tokens * 1e6) if out_tokens
        else None,
        "server_cost_usd": sum(server_costs) if server_costs else None,
        "server_cost_per_1m_output_tokens_usd": (sum(server_costs) / out_tokens * 1e6) if server_costs and out_tokens
        else None,
    }
