"""Evidence for issue 21's "second process" target: what `inferd serve` processes forked from one parent that has
already imported torch and the server stack keep private, against independent ones (benchmarks/memory.py).

An experiment, not a feature: a parent imports torch and inferd's server modules, freezes the garbage collector's
view of those objects (gc.freeze, so collections do not write to their pages), runs no torch op (torch's OpenMP
pool must not exist before a fork), then forks N children, each an ordinary `inferd serve` on its own port that
loads its models itself. Prints each child's USS (private pages) and RSS when ready and after 16 requests at 16
streams, and the parent's.

    python benchmarks/fork_share.py [--children 2] [--model smollm2-135m ...]

The feature built on this is `inferd serve --workers N` (inferd/server/workers.py), measured by
`python benchmarks/memory.py --workers N`.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import free_port, proc_status  # noqa: E402


def uss_mib(pid: int) -> float:
    return round((proc_status(pid, "Private_Clean") + proc_status(pid, "Private_Dirty")) / 2**20, 1)


def rss_mib(pid: int) -> float:
    return round(proc_status(pid, "VmRSS") / 2**20, 1)


def load(port: int, model: str) -> None:
    body = {"model": model, "prompt": "You are a helpful assistant. Summarise in one paragraph why inference "
            "memory decides where a model can run.", "max_tokens": 16, "ignore_eos": True}
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda _: httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600),
                    range(16)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--model", action="append", help="repeatable; default: serve's defaults")
    args = ap.parse_args()
    import torch  # noqa: F401  (the runtime the children share)

    import inferd.cli  # noqa: F401
    import inferd.server.app  # noqa: F401
    import inferd.server.cli  # noqa: F401

    gc.freeze()
    model_args = [a for m in args.model or [] for a in ("--model", m)]
    kids: list[tuple[int, int]] = []
    for _ in range(args.children):
        port = free_port()
        pid = os.fork()
        if pid == 0:
            from inferd.cli import main as cli_main

            os._exit(cli_main(["serve", "--host", "127.0.0.1", "--port", str(port), *model_args]) or 0)
        kids.append((pid, port))
    try:
        deadline = time.monotonic() + 600
        for _, port in kids:
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        time.sleep(1.0)
        print(f"parent {os.getpid()}: USS {uss_mib(os.getpid())} MiB, RSS {rss_mib(os.getpid())} MiB")
        for i, (pid, _) in enumerate(kids):
            print(f"child {i} idle: USS {uss_mib(pid)} MiB, RSS {rss_mib(pid)} MiB")
        for _, port in kids:
            load(port, (args.model or ["smollm2-135m"])[0])
        time.sleep(1.0)
        for i, (pid, _) in enumerate(kids):
            print(f"child {i} after 16 requests at 16 streams: USS {uss_mib(pid)} MiB, RSS {rss_mib(pid)} MiB")
    finally:
        for pid, _ in kids:
            os.kill(pid, signal.SIGTERM)
        for pid, _ in kids:
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
