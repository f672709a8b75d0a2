"""What releasing `balanced`'s mapped bf16 copies when idle costs the next big step (issue 21).

`inferd serve` under `balanced` takes the bf16 copies (used from the repack cache's mapping for steps of ≥ 32 rows)
out of its RSS whenever the engine goes idle; the next big step maps them back from the page cache. This measures
that in one process, the two cases alternated: the first big step after a release against one with the copies
still mapped (wall and process CPU time, minor page faults), and the bare cost of mapping the copies back (touching
one byte per 4 KiB page of every copy after a release, against the same touch with them mapped).

    python benchmarks/copy_release.py [--model smollm2-135m] [--prompt-tokens 64 512] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from inferd import LLM, SamplingParams
from inferd.hardware import machine_info
from inferd.loader.repack_cache import mapped_rss, release_dense_pages


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn) -> tuple[float, float, int]:
    f0, c0, t0 = minflt(), time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0, minflt() - f0


def summary(rows: list[tuple[float, float, int]]) -> str:
    wall, cpu, flt = zip(*rows)
    return (f"wall median {statistics.median(wall) * 1e3:.1f} ms (min {min(wall) * 1e3:.1f}), CPU median "
            f"{statistics.median(cpu) * 1e3:.1f} ms (min {min(cpu) * 1e3:.1f}), minor faults median "
            f"{int(statistics.median(flt))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {machine_info()}  load average {os.getloadavg()[0]:.1f}")
    llm = LLM(args.model, memory_profile="balanced", max_num_seqs=16, kv_cache_memory=0.25,
              enable_prefix_caching=False)
    model = llm.engine.lm.model
    copies = [m.dense for m in model.modules() if getattr(m, "_dense_pages", None)]
    if not copies:
        raise SystemExit("no mapped bf16 copies here (no repack cache, a CPU without native bf16, or not a "
                         "packed GGUF): nothing to release")
    entry = next(line.split()[-1] for line in open("/proc/self/maps") if "/repack/" in line)
    sp = SamplingParams(max_tokens=1, temperature=0)
    ids = {n: [1000 + i % 30000 for i in range(n)] for n in args.prompt_tokens}
    for n in args.prompt_tokens:
        llm.generate([ids[n]], sp)  # warm-up: every page mapped once
    print(f"copies: {sum(c.numel() * c.element_size() for c in copies) / 1e6:.0f} MB in {len(copies)} layers; "
          f"entry resident {mapped_rss(entry) / 2**20:.1f} MiB mapped")

    def touch() -> None:
        for c in copies:
            c.view(-1)[:: 4096 // c.element_size()].sum()

    touch_rows: dict[str, list] = {"mapped": [], "released": []}
    step_rows: dict[tuple[int, str], list] = {(n, k): [] for n in args.prompt_tokens for k in ("mapped", "released")}
    for _ in range(args.rounds):
        touch_rows["mapped"].append(timed(touch))
        release_dense_pages(model)
        touch_rows["released"].append(timed(touch))
        for n in args.prompt_tokens:
            step_rows[(n, "mapped")].append(timed(lambda n=n: llm.generate([ids[n]], sp)))
            release_dense_pages(model)
            released = mapped_rss(entry)
            step_rows[(n, "released")].append(timed(lambda n=n: llm.generate([ids[n]], sp)))
    print(f"entry resident right after a release: {released / 2**20:.1f} MiB (the packed layers)")
    for k, rows in touch_rows.items():
        print(f"touch every copy page, copies {k}: {summary(rows)}")
    for (n, k), rows in step_rows.items():
        print(f"{n}-token prefill, copies {k}: {summary(rows)}")


if __name__ == "__main__":
    main()
