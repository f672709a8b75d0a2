"""bf16 copies for big steps: prepacked for oneDNN (`--memory-profile fast`) vs used plain from the repack-cache
mapping (`small`/`balanced`), on SmolLM2-135M's four linear shapes, interleaved in one process.

    python benchmarks/bf16_copy_prepack.py [--threads 1] [--reps 3]

Prints, per step size (rows), total ms of 20 calls x 4 shapes x reps for each and the ratio plain / prepacked.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from inferd.ops import onednn

SHAPES = [(1728, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down (N, K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not onednn.available():
        raise SystemExit("oneDNN bf16 is not available on this CPU: nothing to compare")
    torch.set_num_threads(args.threads)
    for rows in (32, 64, 128, 256):
        t_packed = t_plain = 0.0
        for _ in range(args.reps):
            for n, k in SHAPES:
                w, x = torch.randn(n, k).bfloat16(), torch.randn(rows, k).bfloat16()
                p = onednn.prepack(w)
                assert p is not None
                for packed in (True, False):
                    def f() -> torch.Tensor:
                        return onednn.linear(x, p) if packed else F.linear(x, w)  # noqa: B023
                    f()
                    t = time.perf_counter()
                    for _ in range(20):
                        f()
                    dt = time.perf_counter() - t
                    if packed:
                        t_packed += dt
                    else:
                        t_plain += dt
        print(f"rows {rows}: prepacked {t_packed * 1e3:.1f} ms, plain {t_plain * 1e3:.1f} ms, "
              f"plain/prepacked {t_plain / t_packed:.2f}")


if __name__ == "__main__":
    main()
