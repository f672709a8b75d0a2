"""The router policies and the cluster simulator (`inferd simulate`): plain Python, no model, no Ray."""

from __future__ import annotations

import json
import math
import random

import pytest

from inferd.cli import main
from inferd.cluster.router import Router, RouterConfig, text_prefix_hashes
from inferd.cluster.service_model import MEASURED_DECODE, ServiceModel, fit_decode
from inferd.cluster.simulate import simulate
from inferd.cluster.workload import SimRequest, WorkloadConfig


def test_round_robin_cycles_and_least_loaded_picks_the_idle_replica():
    rr = Router(RouterConfig(policy="round-robin"))
    assert [rr.choose([], [0, 0, 0]) for _ in range(6)] == [1, 2, 0, 1, 2, 0]
    ll = Router(RouterConfig(policy="least-loaded"))
    assert {ll.choose([], [5, 0]) for _ in range(20)} == {1}
    # power of two choices over many replicas: never the busiest of two distinct candidates
    loads = list(range(50))
    picks = [ll.choose([], loads) for _ in range(500)]
    assert sum(picks) / len(picks) < 20  # a uniform pick would average 24.5


def test_prefix_routing_follows_the_deepest_prefix_within_the_imbalance_bound():
    r = Router(RouterConfig(policy="prefix", imbalance_abs=4, imbalance_rel=1.5, seed=1))
    loads = [0, 0, 0, 0]
    first = r.choose([11, 12], loads)
    assert all(r.choose([11, 12, 13], loads) == first for _ in range(10))  # shares the prefix: same replica
    loads[first] = 3  # busier, but within the bound
    assert r.choose([11], loads) == first
    loads[first] = 10  # over the bound: the power-of-two choice instead, and the prefix now lives there too
    other = r.choose([11], loads)
    assert other != first and r.fallbacks == 1
    assert r.choose([11, 99], [0, 0, 0, 0]) == other
    r.forget_replica(other)
    assert r.choose([11], [0, 0, 0, 0]) in range(4)
    # keyed loads (the Ray ingress: replica ids): same decisions, keys back
    k = Router(RouterConfig(policy="prefix", seed=1))
    first_key = k.choose([5], {"a": 0, "b": 0})
    assert all(k.choose([5, 6], {"a": 0, "b": 0}) == first_key for _ in range(5))
    assert k.choose([5], {"c": 0}) == "c"  # the owner is gone: fall back to the live replicas
    with pytest.raises(ValueError, match="unknown routing policy"):
        RouterConfig(policy="random")


def test_text_prefix_hashes_are_chained_over_full_chunks():
    system = "You are a careful assistant. " * 20  # 580 characters
    a = text_prefix_hashes(system + "What is 2+2?", chunk_chars=128)
    b = text_prefix_hashes(system + "Name a colour.", chunk_chars=128)
    assert len(a) == len(b) == 4 and a == b  # the differing tails are in no full chunk
    c = text_prefix_hashes("x" + system, chunk_chars=128)
    assert not set(a) & set(c)  # a chain: one differing character changes every later hash
    assert text_prefix_hashes("short") == []


def test_service_model_fit_matches_the_measured_points():
    base, per_seq = fit_decode(MEASURED_DECODE)
    for n, tps in MEASURED_DECODE[1:]:
        assert abs((base + per_seq * n) - n / tps) / (n / tps) < 0.25
    with pytest.raises(ValueError):
        fit_decode([(4, 100.0)])


def test_mm1_mean_wait_matches_the_formula():
    """One replica that serves one request at a time, exponential service (prefill of a geometric number of
    tokens), Poisson arrivals: the mean wait in queue must be rho / (mu - lambda)."""
    lam, mean_tokens, n = 0.5, 1000, 60000
    svc = ServiceModel(base_s=0.0, per_seq_s=0.0, per_prefill_token_s=1.0 / mean_tokens, token_budget=10**9,
                       max_num_seqs=1, cache_tokens=1)
    rng = random.Random(7)
    reqs, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(lam)
        tokens = 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean_tokens))  # geometric
        reqs.append(SimRequest(i, t, [(i, tokens)], tokens, 1, -i - 1))
    waits: list[float] = []
    simulate(1, None, RouterConfig(policy="round-robin"), svc, duration_s=t + 1, warmup_s=0.0, requests=reqs,
             on_finish=lambda r: waits.append(r.first_token_s - r.arrival - r.prompt_tokens / mean_tokens))
    mu = 1.0
    expected = (lam / mu) / (mu - lam)
    assert len(waits) == n
    assert abs(sum(waits) / n - expected) / expected < 0.05


def test_policy_comparison_is_deterministic_and_prefix_routing_wins_on_hits():
    wl = WorkloadConfig(conversations_per_s=12.0, seed=3)
    res = {p: simulate(20, wl, RouterConfig(policy=p, seed=3), duration_s=30, warmup_s=5)
           for p in ("prefix", "round-robin")}
    again = simulate(20, wl, RouterConfig(policy="prefix", seed=3), duration_s=30, warmup_s=5)
    assert again == res["prefix"]
    assert res["prefix"].requests > 300
    assert res["prefix"].hit_rate > res["round-robin"].hit_rate + 0.2
    assert res["prefix"].ttft_p50_s < res["round-robin"].ttft_p50_s


def test_simulate_cli_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "sim.json"
    args = ["simulate", "--replicas", "4", "--policy", "prefix", "round-robin", "--duration", "12", "--warmup", "2",
            "--slo-ttft-p99", "1", "--json", str(out)]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(tmp_path / "plots")]
    except ImportError:
        pass
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| 4 |" in table and "prefix" in table and "round-robin" in table
    rows = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in rows] == ["prefix", "round-robin"]
    assert all(r["requests"] > 0 and r["replicas_for_slo"] for r in rows)
    if "--plot" in args:
        assert (tmp_path / "plots" / "ttft_p99_vs_replicas_4.png").stat().st_size > 1000
    assert main(["simulate", "--replicas", "0"]) == 1
    assert main(["simulate", "--policy", "random", "--replicas", "2"]) == 1


def test_serve_replica_flags_are_checked_before_ray_starts(capsys):
    assert main(["serve", "--replicas", "0"]) == 1
    assert main(["serve", "--replicas", "2", "--min-replicas", "1"]) == 1
    assert main(["serve", "--replicas", "5", "--min-replicas", "1", "--max-replicas", "4"]) == 1
    assert main(["serve", "--replicas", "2", "--replica-cpus", "0"]) == 1
    assert main(["serve", "--replicas", "1", "--min-replicas", "1", "--max-replicas", "2", "--downscale-delay",
                 "-1"]) == 1
    err = capsys.readouterr().err
    assert "--replicas must be at least 1" in err and "together" in err and "--max-replicas" in err
    assert "--upscale-delay and --downscale-delay must be >= 0" in err


def test_request_overhead_adds_to_ttft_and_delays_the_replica():
    """A fixed per-request latency (HTTP and routing hops) comes before the replica's queue: a lone request's TTFT
    grows by exactly that much, and two requests 1 ms apart still queue in arrival order."""
    def ttfts(overhead: float) -> list[float]:
        svc = ServiceModel(base_s=0.01, per_seq_s=0.0, per_prefill_token_s=0.001, request_overhead_s=overhead)
        reqs = [SimRequest(i, 1.0 + i * 0.001, [(100 + i, 64)], 64, 4, 200 + i) for i in range(2)]
        done: list[SimRequest] = []
        simulate(1, None, RouterConfig(policy="round-robin"), svc, 10.0, 0.0, requests=reqs, on_finish=done.append)
        return [q.first_token_s - q.arrival for q in sorted(done, key=lambda q: q.rid)]

    base, slow = ttfts(0.0), ttfts(0.025)
    assert base[0] == pytest.approx(0.01 + 0.064)  # one step: base + 64 prefill tokens
    assert slow[0] == pytest.approx(base[0] + 0.025) and slow[1] == pytest.approx(base[1] + 0.025)
    assert slow[1] > slow[0]  # the second still waits behind the first


def test_step_jitter_draws_measured_factors_seeded_and_none_keeps_it_exact():
    """--step-jitter: each segment's step time is scaled by one of the given factors (seeded, so a run repeats); a
    lone one-step request's TTFT is exactly step_s times a factor from the list; without factors nothing moves."""
    factors = (0.5, 1.0, 3.0)

    def ttfts(jitter: tuple[float, ...], seed: int) -> list[float]:
        svc = ServiceModel(base_s=0.01, per_seq_s=0.0, per_prefill_token_s=0.001, step_jitter=jitter)
        reqs = [SimRequest(i, 1.0 + i, [(100 + i, 64)], 64, 2, 200 + i) for i in range(40)]  # each alone
        done: list[SimRequest] = []
        simulate(1, None, RouterConfig(policy="round-robin", seed=seed), svc, 60.0, 0.0, requests=reqs,
                 on_finish=done.append)
        return [q.first_token_s - q.arrival for q in sorted(done, key=lambda q: q.rid)]

    exact = ttfts((), 0)
    assert exact == pytest.approx([0.074] * 40)
    got = ttfts(factors, 1)
    assert {round(t / 0.074, 6) for t in got} == set(factors)  # 40 draws: every factor appears
    assert ttfts(factors, 1) == got and ttfts(factors, 2) != got


def test_simulate_cli_rejects_bad_step_jitter(capsys):
    from inferd.cli import main

    assert main(["simulate", "--replicas", "2", "--duration", "5", "--step-jitter", "1,-2"]) == 1
    assert "--step-jitter factors must be positive" in capsys.readouterr().err
    assert main(["simulate", "--replicas", "2", "--duration", "5", "--step-jitter", "1,x"]) == 1
    assert "--step-jitter needs comma-separated numbers, got '1,x'" in capsys.readouterr().err
