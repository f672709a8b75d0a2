"""`balanced` keeps its bf16 copies (for steps of many rows) as views of the repack cache's file; when the engine
goes idle their pages leave the process's RSS (MADV_DONTNEED on the never-written private mapping) and the next
big step maps them back from the page cache with the same results. Measured with /proc/self/smaps and counters."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from inferd import LLM, SamplingParams
from inferd.engine.async_engine import AsyncLLM
from inferd.loader.repack_cache import DENSE_ALIGN, map_entry, mapped_rss
from tests.proc_maps import vm_flags
from tests.tiny_models import write_gguf, write_hf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]  # 8 rows ≥ quant_dense_rows=4: the prefill uses the bf16 copies


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INFERD_REPACK_CACHE", raising=False)
    return tmp_path / "home"


def _llm(tmp_path, profile: str = "balanced") -> LLM:
    gguf = write_gguf(tmp_path / "m.gguf", write_hf(tmp_path / "m"), quant="Q4_0")
    return LLM(str(gguf), quantization="gguf", dtype="float32", kv_cache_memory=0.02, quant_dense_rows=4,
               enable_prefix_caching=False, memory_profile=profile)


def _copy_pages(llm: LLM) -> int:
    return sum(m._dense_pages[2] for m in llm.engine.lm.model.modules() if getattr(m, "_dense_pages", None))


def test_release_takes_the_mapped_copies_out_of_rss_and_a_big_step_maps_them_back(tmp_path, home):
    llm = _llm(tmp_path)
    (entry,) = (home / "repack").glob("*.safetensors")
    pages = _copy_pages(llm)
    assert pages > 0  # every decoder linear's copy is a view of the entry
    ref = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    touched = mapped_rss(entry)

    released = llm.engine.release_idle_memory()
    assert released == pages and llm.engine.copy_releases == 1
    idle = mapped_rss(entry)
    assert touched - idle >= pages  # the copies' pages left the RSS; the packed layers' stay
    llm.generate([[5, 6]], GREEDY)  # steps of < 4 rows: packed kernels only
    assert mapped_rss(entry) <= idle  # mapping the packed pages back did not map copy pages with them

    again = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    assert again == ref  # the copies read back from the file: same weights, same greedy output
    assert mapped_rss(entry) - idle >= pages  # the big step mapped them again


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_the_entry_is_mapped_asking_for_huge_pages(tmp_path, home):
    llm = _llm(tmp_path)
    packed = next(m.packed for m in llm.engine.lm.model.modules() if getattr(m, "packed", None) is not None)
    assert "hg" in vm_flags(packed)  # MADV_HUGEPAGE on the mapping the layers view
    assert llm.generate([[5, 6]], GREEDY)[0].outputs[0].token_ids


def test_the_entry_is_written_in_aligned_pieces(tmp_path, home, monkeypatch):
    """CacheWriter.finish ends its writes on DENSE_ALIGN boundaries of the entry (so the page cache can hold whole
    aligned ranges in huge folios): scaled down to 4 KiB boundaries and 16 KiB writes for the tiny model, every
    write but the header's and each run's last ends on a boundary."""
    from inferd.loader import repack_cache

    align = 4096
    monkeypatch.setattr(repack_cache, "DENSE_ALIGN", align)
    monkeypatch.setattr(repack_cache, "_COPY_CHUNK", 4 * align)
    ends: list[int] = []

    class Recording:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            n = self.f.write(b)
            ends.append(self.f.tell())
            return n

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = open

    def recording_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Recording(f) if ".tmp" in str(path) and "w" in mode else f

    monkeypatch.setattr(repack_cache, "open", recording_open, raising=False)
    _llm(tmp_path)
    unaligned = [e for e in ends if e % align]
    assert len(ends) >= 10 and len(unaligned) <= 3, (len(ends), len(unaligned))  # header, packed run's end, file end


def test_the_copies_sit_in_their_own_aligned_section_of_the_entry(tmp_path, home):
    _llm(tmp_path)
    (entry,) = (home / "repack").glob("*.safetensors")
    _, header, _, base = map_entry(entry)
    dense = [base + r["data_offsets"][0] for k, r in header.items() if k.endswith("/@dense")]
    packed_end = max(base + r["data_offsets"][1] for k, r in header.items() if not k.endswith("/@dense"))
    assert dense and min(dense) % DENSE_ALIGN == 0 and min(dense) >= packed_end


def test_the_server_engine_releases_when_it_goes_idle(tmp_path, home):
    llm = _llm(tmp_path)
    (entry,) = (home / "repack").glob("*.safetensors")
    aengine = AsyncLLM(llm.engine)
    try:
        async def one(rid: str) -> list[int]:
            last = None
            async for ro in aengine.generate(rid, PROMPT, GREEDY):
                last = ro
            return last.outputs[0].token_ids

        first = asyncio.run(one("a"))
        deadline = time.monotonic() + 30  # the engine thread notices idleness within its 0.1 s wait
        while llm.engine.copy_releases < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert llm.engine.copy_releases == 1 and llm.engine.copy_bytes_released == _copy_pages(llm)
        idle = mapped_rss(entry)
        assert asyncio.run(one("b")) == first
        while llm.engine.copy_releases < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert llm.engine.copy_releases == 2  # once per busy period, not on every idle wake-up
        time.sleep(0.3)
        assert llm.engine.copy_releases == 2
        assert mapped_rss(entry) <= idle + 4096 * 4  # back out of the RSS (a few shared boundary pages may stay)
    finally:
        aengine.shutdown()


def test_small_keeps_no_copies_and_releases_nothing(tmp_path, home):
    gguf = write_gguf(tmp_path / "m.gguf", write_hf(tmp_path / "m"), quant="Q4_0")
    llm = LLM(str(gguf), quantization="gguf", dtype="float32", kv_cache_memory=0.02, memory_profile="small")
    llm.generate([PROMPT], GREEDY)
    assert _copy_pages(llm) == 0 and llm.engine.release_idle_memory() == 0 and llm.engine.copy_releases == 0
