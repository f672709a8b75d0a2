"""A replica's step time as a function of what the step holds, for the cluster simulator.

    step_s = base_s + per_seq_s * running_sequences + per_prefill_token_s * prefill_tokens

times a factor drawn from `step_jitter` when one is given (a host's measured variability), plus a fixed
`request_overhead_s` between a request's arrival and its replica's queue (the server's HTTP and
routing hops: through Ray Serve, the proxy and the ingress), which every TTFT includes.

The defaults are fitted to this repository's measurements of SmolLM2-135M Q4_1 with default flags on the 2-vCPU
Intel Xeon (Sapphire Rapids class) host of docs/benchmarks.md ("Serving through HTTP", 2026-11-26), not re-measured
(the hosts these sessions share are too loaded for a service-time fit): `inferd bench offline --input-len 63 --output-len 128`
gave 148.9 / 402.1 / 544.3 / 696.7 output tok/s at 1 / 4 / 16 / 64 sequences, i.e. decode steps of 6.7 / 9.9 /
29.4 / 91.9 ms; the least-squares line through them (`fit_decode`, run at import on `MEASURED_DECODE`) is
5.7 ms + 1.35 ms per running sequence. Prefill of a 512-token prompt ran at 3670 tok/s (0.27 ms per token).
`inferd simulate --decode-points` refits from other measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# (running sequences, output tok/s) from `inferd bench offline`, docs/benchmarks.md (2026-11-26)
MEASURED_DECODE: tuple[tuple[int, float], ...] = ((1, 148.9), (4, 402.1), (16, 544.3), (64, 696.7))


def fit_decode(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (base_s, per_seq_s) from (sequences, output tok/s) measurements: the step time at n
    sequences is n / tok_s."""
    if len(points) < 2:
        raise ValueError("fit_decode needs at least two (sequences, tok/s) points")
    xs = [float(n) for n, _ in points]
    ys = [n / tps for n, tps in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_decode needs points at two different sequence counts")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


_BASE_S, _PER_SEQ_S = fit_decode(MEASURED_DECODE)


@dataclass(frozen=True)
class ServiceModel:
    base_s: float = _BASE_S
    per_seq_s: float = _PER_SEQ_S
    per_prefill_token_s: float = 0.00027
    token_budget: int = 256  # tokens per step (decode + prefill chunk), the engine's max_num_batched_tokens
    max_num_seqs: int = 64
    cache_tokens: int = 65536  # KV tokens a replica keeps for prefix reuse (LRU)
    block_size: int = 16  # only full blocks are reused
    request_overhead_s: float = 0.0  # from arrival to the replica's queue: HTTP and routing hops (adds to TTFT)
    # measured step-time variability: multiplicative factors (around 1), one drawn per scheduled segment (a prefill
    # step or a stretch of identical decode steps) from a seeded RNG; empty = every step exactly step_s. Taken from
    # a calibration's spread (benchmarks/sim_validate.py: each request's TPOT over its median at that batch size)
    step_jitter: tuple[float, ...] = ()

    def step_s(self, running: int, prefill_tokens: int) -> float:
        return self.base_s + self.per_seq_s * running + self.per_prefill_token_s * prefill_tokens
