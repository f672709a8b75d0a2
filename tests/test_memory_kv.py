"""KV cache memory: blocks are backed by pages only when first used; low block ids are handed out first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inferd import LLM
from inferd.engine.block_manager import KVCacheManager
from inferd.engine.request import Request
from inferd.engine.runner import lazy_zeros
from inferd.sampling_params import SamplingParams
from tests.proc_maps import vm_flags
from tests.tiny_models import write_hf


def make(rid: str, n_prompt: int, base: int = 0) -> Request:
    return Request(rid, [base + i for i in range(n_prompt)], SamplingParams(max_tokens=4), eos_token_ids=(9999,),
                   max_tokens=4)


def hold(kv: KVCacheManager, req: Request) -> Request:
    assert kv.allocate_slots(req, req.num_prompt_tokens)
    req.num_computed_tokens = req.num_prompt_tokens
    kv.cache_full_blocks(req)
    return req


def test_lowest_free_blocks_first_and_high_water():
    kv = KVCacheManager(num_blocks=100, block_size=4, enable_prefix_caching=False)
    a, b = hold(kv, make("a", 8)), hold(kv, make("b", 8))
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3] and kv.high_water == 4
    kv.free_request(a)
    c = hold(kv, make("c", 12))  # reuses the freed low ids before touching a new block
    assert c.block_ids == [0, 1, 4] and kv.high_water == 5
    for _ in range(20):  # churn at a steady load never touches more blocks than its peak
        kv.free_request(c)
        c = hold(kv, make("c", 12))
    assert kv.high_water == 5 and kv.num_used_blocks == 5


def test_grow_before_evict_keeps_prefixes_and_small_profile_evicts():
    for grow in (True, False):
        kv = KVCacheManager(num_blocks=100, block_size=4, grow_before_evict=grow)
        a = hold(kv, make("a", 8, base=100))
        kv.free_request(a)  # its two full blocks stay in the prefix cache
        hold(kv, make("b", 8, base=200))
        if grow:
            assert kv.high_water == 4 and len(kv.cached) == 4
        else:  # reuses a's (cached, already touched) blocks rather than touching new memory
            assert kv.high_water == 2 and len(kv.cached) == 2
        assert kv.num_free_blocks + kv.num_used_blocks == 100


_RSS_SCRIPT = r"""
import json, sys
from inferd import LLM, SamplingParams

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

LLM(sys.argv[1], dtype="float32", kv_cache_memory=0.01)  # imports, kernels, allocator pools: not the KV
before = rss()
llm = LLM(sys.argv[1], dtype="float32", kv_cache_memory=2.0, max_num_seqs=16)
built = rss()
per_block = llm.engine.runner.kv_caches[0].nbytes // llm.engine.kv.num_blocks * len(llm.engine.runner.kv_caches)
prompts = [[3 + (i * 7 + j) % 200 for j in range(480)] for i in range(16)]
llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
print(json.dumps({"before": before, "built": built, "after": rss(), "pool": per_block * llm.engine.kv.num_blocks,
                  "high_water": llm.engine.kv.high_water, "per_block": per_block}))
"""


def test_kv_pool_is_backed_only_when_used(tmp_path: Path):
    # 4 layers x 4 KV heads x 64 dims in fp32: 8 KiB of K/V per token, so 16 x 480 tokens = 60 MiB
    model = write_hf(tmp_path / "kv-model", config={"hidden_size": 256, "num_attention_heads": 4,
                                                    "num_key_value_heads": 4, "num_hidden_layers": 4})
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert m["pool"] >= 1.9 * (1 << 30)
    assert m["built"] - m["before"] < 32 * mib, m  # a 2 GiB pool costs (almost) nothing until used
    used = m["high_water"] * m["per_block"]
    # at most 16 sequences of 31 blocks at once (fewer: the first finish while the last are still prefilled)
    assert 16 * 15 <= m["high_water"] <= 16 * 31, m
    assert m["after"] - m["built"] > 0.8 * used, m  # ... and grows as blocks are written
    assert m["after"] - m["built"] < used + 128 * mib, m


def test_metrics_report_weight_and_kv_bytes(tiny_llm):
    from prometheus_client import generate_latest

    from inferd.server.metrics import Metrics

    eng = tiny_llm.engine
    m = Metrics()
    m.add_model("tiny", eng)

    def gauge(name: str, labels: str) -> float:
        text = generate_latest(m.registry).decode()
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(name) and labels in line)

    assert gauge("inferd_model_weight_bytes", 'model_name="tiny"') == eng.weight_bytes > 0
    assert gauge("inferd_kv_cache_bytes", 'kind="max"') == eng.kv.num_blocks * eng.kv_plan.full_block_bytes
    eng.add_request("mem", list(range(3, 60)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    eng.step()
    m.on_step("tiny", eng)
    assert gauge("inferd_kv_cache_bytes", 'kind="used"') == 4 * eng.kv_plan.full_block_bytes  # 57 tokens: 4 blocks
    assert gauge("inferd_kv_cache_bytes", 'kind="resident"') >= 4 * eng.kv_plan.full_block_bytes
    eng.abort_request("mem")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="needs Linux /proc/self/smaps and a kernel with transparent huge pages")
def test_kv_pool_page_size_follows_profile(tiny_llm, tiny_hf):
    # the pool asks for 2 MiB pages (fast: fewer TLB misses at many streams) or forbids them (small, balanced)
    assert "hg" in vm_flags(lazy_zeros((4, 1 << 20), torch.float32, huge_pages=True))
    assert "nh" in vm_flags(lazy_zeros((4, 1 << 20), torch.float32, huge_pages=False))
    assert tiny_llm.engine.config.memory_profile == "balanced"
    assert "nh" in vm_flags(tiny_llm.engine.runner.kv_caches[0])
    fast = LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.01, memory_profile="fast")
    assert "hg" in vm_flags(fast.engine.runner.kv_caches[0])
