"""Same-run A/B of `inferd serve` start-up between source trees (e.g. main and a branch): per round and tree, a
first server (launch → /ready wall time, the process's CPU time at /ready, idle RSS) and a second one beside it
(its wall and CPU to /ready, its private pages = what it adds). The trees alternate, so a busy host affects both
alike; CPU time at /ready is the figure a loaded host distorts least.

    python benchmarks/startup_ab.py old=/path/to/main/checkout new=. [--rounds 2] [-- serve args...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from memory import free_port, proc_status  # noqa: E402
from proc_cpu import cpu_seconds  # noqa: E402
from serving import stop_server  # noqa: E402

READY_TIMEOUT_S = 300.0  # launch to /ready, however loaded the host


def start(tree: str, serve_args: list[str]) -> tuple[subprocess.Popen, float, float]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", "serve", "--port", str(port), *serve_args],
                            env={**os.environ, "PYTHONPATH": tree}, cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = t0 + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server from {tree} exited with {proc.returncode}")
        if time.perf_counter() > deadline:
            stop_server(proc)
            raise RuntimeError(f"server from {tree} not ready after {READY_TIMEOUT_S:.0f} s")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0, cpu_seconds(proc.pid)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="NAME=PATH of each source tree")
    ap.add_argument("--rounds", type=int, default=2)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    serve_args = argv[cut + 1 :]  # after --: arguments for inferd serve
    trees = dict(t.split("=", 1) for t in args.trees)
    mib = 1 << 20
    for r in range(args.rounds):
        for name, tree in trees.items():
            a, wall, cpu = start(str(Path(tree).resolve()), serve_args)
            time.sleep(1.0)
            rss = proc_status(a.pid, "VmRSS") / mib
            b, wall2, cpu2 = start(str(Path(tree).resolve()), serve_args)
            time.sleep(1.0)
            uss = (proc_status(b.pid, "Private_Clean") + proc_status(b.pid, "Private_Dirty")) / mib
            print(json.dumps({"tree": name, "round": r, "ready_s": round(wall, 2), "cpu_at_ready_s": round(cpu, 2),
                              "second_ready_s": round(wall2, 2), "second_cpu_at_ready_s": round(cpu2, 2),
                              "idle_rss_mib": round(rss, 1), "second_adds_mib": round(uss, 1),
                              "second_adds_x": round(uss / rss, 2), "load_avg": round(os.getloadavg()[0], 1)}),
                  flush=True)
            for p in (a, b):
                stop_server(p, 60)


if __name__ == "__main__":
    main()
