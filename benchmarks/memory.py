"""Footprint of `inferd serve` (and optionally llama-cpp-python's server on the same GGUF): launch → /ready time
(first and second start), idle RSS, RSS and peak after a 16-stream load, and two processes on one model (how much
the second adds, from PSS: pages shared between the two count half to each).

    python benchmarks/memory.py                                   # default serve (SmolLM2 + MiniLM)
    python benchmarks/memory.py --model smollm2-135m --kv-cache-memory 0.19 [--memory-profile small]
    python benchmarks/memory.py --model smollm2-135m --kv-cache-memory 0.19 --peer-python /tmp/peers/bin/python
    python benchmarks/memory.py --workers 2          # `inferd serve --workers 2`: what each further worker adds

`--peer-python`: a Python with `llama-cpp-python[server]`; its server gets `--n_ctx 8192` (the KV size of
llama-server `-np 16 -c 8192`). Prints one JSON object per configuration and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPT = ("You are a helpful assistant. Summarise the following in one paragraph: inference turns a trained model "
          "into answers, and the memory it needs decides where it can run and what it costs per replica.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status or smaps_rollup field in bytes (VmRSS, VmHWM, Pss...)."""
    for fname in ("status", "smaps_rollup"):
        try:
            for line in Path(f"/proc/{pid}/{fname}").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 0


class Server:
    def __init__(self, cmd: list[str], ready_path: str, port: int):
        self.port, self.ready = port, f"http://127.0.0.1:{port}{ready_path}"
        self.log = tempfile.TemporaryFile("w+")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready_s = self._wait()

    def phases(self) -> dict[str, float]:
        """inferd's start-up phase log lines: seconds after launch of each phase, and each model's load time."""
        self.log.seek(0)
        text = self.log.read()
        out = {m.group(1): float(m.group(2))
               for m in re.finditer(r"start-up: (.+?) at ([0-9.]+) s after launch", text)}
        out.update({f"load {m.group(1)}": float(m.group(2))
                    for m in re.finditer(r"model ready: (\S+) \(loaded in ([0-9.]+) s\)", text)})
        return out

    def _wait(self, timeout: float = 300) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.ready, timeout=1).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server not ready")

    def mib(self, key: str) -> float:
        return round(proc_status(self.proc.pid, key) / (1 << 20), 1)

    def uss_mib(self) -> float:
        """Pages only this process maps (what it adds beside processes that share the rest with it)."""
        return round(self.mib("Private_Clean") + self.mib("Private_Dirty"), 1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(port: int, model: str, streams: int = 16, requests: int = 32, max_tokens: int = 128) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    def one(_: int) -> None:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600)
        r.raise_for_status()

    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        list(ex.map(one, range(requests)))
    return time.perf_counter() - t


def inferd_cmd(args: argparse.Namespace, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "inferd.cli", "--log-level", "INFO", "serve", "--port", str(port),
           "--memory-profile", args.memory_profile]
    for m in args.model or []:
        cmd += ["--model", m]
    if args.kv_cache_memory is not None:
        cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
    return cmd


def peer_cmd(args: argparse.Namespace, port: int, gguf: str) -> list[str]:
    return [args.peer_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_ctx", "8192",
            "--n_threads", str(os.cpu_count()), "--model_alias", "smollm2-135m", "--interrupt_requests", "False"]


def measure(name: str, make_cmd, ready_path: str, model: str, two: bool = True, one: bool = True) -> dict:
    res: dict = {"server": name}
    for start in ("first", "second") if one else ():
        port = free_port()
        s = Server(make_cmd(port), ready_path, port)
        res[f"ready_s_{start}"] = round(s.ready_s, 2)
        if start == "first":
            time.sleep(1.0)
            res["idle_rss_mib"] = s.mib("VmRSS")
            res["load_s"] = round(load(port, model), 1)
            res["rss_after_load_mib"] = s.mib("VmRSS")
            res["peak_rss_mib"] = s.mib("VmHWM")
        if s.phases():  # read last: the loader thread logs "every model ready" as /ready turns 200
            res[f"phases_{start}"] = s.phases()
        s.stop()
    if two:  # two processes on one model: PSS splits shared pages between them
        ports = [free_port(), free_port()]
        a = Server(make_cmd(ports[0]), ready_path, ports[0])
        time.sleep(1.0)
        alone = a.mib("VmRSS")
        b = Server(make_cmd(ports[1]), ready_path, ports[1])
        time.sleep(1.0)
        pss = a.mib("Pss") + b.mib("Pss")
        # What B adds = its private pages (USS): every page it shares (the mapped weights with A, the libraries
        # with A and with anything else running) is resident anyway. (PSS(A) + PSS(B) - RSS(A), the earlier
        # measure, undercounts on a busy host: PSS splits library pages among every process using them.)
        res["two_procs"] = {"rss_a_alone": alone, "rss_a": a.mib("VmRSS"), "rss_b": b.mib("VmRSS"),
                            "pss_sum": round(pss, 1), "second_adds": b.uss_mib()}
        # after a short 16-stream load on each, the weights (and the bf16 copies of big steps) are resident
        for s in (a, b):
            load(s.port, model, requests=16, max_tokens=16)
        time.sleep(1.0)
        res["two_procs"].update({"rss_a_loaded": a.mib("VmRSS"), "rss_b_loaded": b.mib("VmRSS"),
                                 "second_adds_loaded": b.uss_mib()})
        a.stop()
        b.stop()
    return res


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def uss(pid: int) -> float:
    return round((proc_status(pid, "Private_Clean") + proc_status(pid, "Private_Dirty")) / (1 << 20), 1)


def rss(pid: int) -> float:
    return round(proc_status(pid, "VmRSS") / (1 << 20), 1)


def measure_workers(args: argparse.Namespace, model: str) -> dict:
    """`inferd serve --workers N`: the parent's and each worker's RSS and USS (private pages) when every worker is
    ready and after a 16-stream load, and the whole tree's PSS. What worker k > 0 adds is its USS: every page it
    shares (the runtime with the parent and the other workers, the mapped weights) is resident anyway."""
    port = free_port()
    cmd = inferd_cmd(args, port) + ["--workers", str(args.workers)]
    s = Server(cmd, "/ready", port)
    want = f"all {args.workers} workers ready"
    deadline = time.perf_counter() + 600
    while want not in _log(s):
        if time.perf_counter() > deadline or s.proc.poll() is not None:
            raise RuntimeError("workers not ready:\n" + _log(s)[-3000:])
        time.sleep(0.1)
    res: dict = {"server": f"inferd --workers {args.workers}", "all_ready_s": round(time.perf_counter() - s.t0, 2)}
    order = {int(m.group(2)): int(m.group(1)) for m in re.finditer(r"worker (\d+) started \(pid (\d+)\)", _log(s))}
    time.sleep(1.0)

    def snapshot() -> dict:
        pids = sorted(children(s.proc.pid), key=lambda p: order.get(p, 99))
        tree = [s.proc.pid, *pids]
        return {"parent": {"rss": rss(s.proc.pid), "uss": uss(s.proc.pid)},
                "workers": [{"rss": rss(p), "uss": uss(p)} for p in pids],
                "tree_pss": round(sum(proc_status(p, "Pss") for p in tree) / (1 << 20), 1)}

    res["idle"] = snapshot()
    res["load_s"] = round(load(port, model, requests=32, max_tokens=64), 1)
    time.sleep(1.0)
    res["after_load"] = snapshot()
    s.stop()
    return res


def _log(s: Server) -> str:
    s.log.seek(0)
    return s.log.read()


def print_workers(r: dict) -> None:
    print("\n| `inferd serve --workers N` | parent RSS / USS | worker 0 RSS | each further worker adds (USS) | "
          "ratio to worker 0's RSS | whole tree PSS |")
    print("|---|---|---|---|---|---|")
    for when in ("idle", "after_load"):
        snap = r[when]
        first = snap["workers"][0]["rss"]
        adds = [w["uss"] for w in snap["workers"][1:]]
        print(f"| {when.replace('_', ' ')} | {snap['parent']['rss']} / {snap['parent']['uss']} MiB | {first} MiB | "
              f"{', '.join(f'{a}' for a in adds)} MiB | {', '.join(f'{a / first:.2f}x' for a in adds)} | "
              f"{snap['tree_pss']} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="repeatable; default: serve's defaults")
    ap.add_argument("--kv-cache-memory", type=float)
    ap.add_argument("--memory-profile", default="balanced", choices=["small", "balanced", "fast"])
    ap.add_argument("--peer-python", help="a Python with llama-cpp-python[server]")
    ap.add_argument("--no-two", action="store_true", help="skip the two-process measurement")
    ap.add_argument("--two-only", action="store_true", help="only the two-process measurement")
    ap.add_argument("--workers", type=int, default=0,
                    help="measure `inferd serve --workers N` (only that, unless --with-processes)")
    ap.add_argument("--with-processes", action="store_true",
                    help="with --workers: also the independent two-process measurement, in the same run")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
          f"{' '.join(sys.argv)}", flush=True)
    if args.workers:
        w = measure_workers(args, (args.model or ["smollm2-135m"])[0])
        print(json.dumps(w), flush=True)
        if args.with_processes:
            two = measure(f"inferd ({args.memory_profile})", lambda p: inferd_cmd(args, p), "/ready",
                          (args.model or ["smollm2-135m"])[0], True, False)
            print(json.dumps(two), flush=True)
            t = two["two_procs"]
            print(f"\nindependent processes, same run: second adds {t['second_adds']} MiB idle "
                  f"({t['second_adds'] / t['rss_a_alone']:.2f}x of {t['rss_a_alone']} MiB; both {t['pss_sum']} MiB PSS), "
                  f"{t['second_adds_loaded']} MiB after a load ({t['second_adds_loaded'] / t['rss_a_loaded']:.2f}x)")
        print_workers(w)
        return
    rows = [measure(f"inferd ({args.memory_profile})", lambda p: inferd_cmd(args, p), "/ready",
                    (args.model or ["smollm2-135m"])[0], not args.no_two, not args.two_only)]
    print(json.dumps(rows[-1]), flush=True)
    if args.peer_python:
        from inferd.loader import hub

        gguf = str(hub.resolve("smollm2-135m"))
        rows.append(measure("llama-cpp-python server", lambda p: peer_cmd(args, p, gguf), "/v1/models",
                            "smollm2-135m", not args.no_two, not args.two_only))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| server | ready 1st s | ready 2nd s | idle RSS MiB | RSS after 16-stream load | peak RSS | "
          "second process adds (its USS), idle | same, both after a load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "idle_rss_mib" not in r:  # --two-only
            continue
        two = r.get("two_procs", {})
        idle = f"{two['second_adds']} ({two['second_adds'] / two['rss_a_alone']:.2f}x)" if two else "-"
        loaded = (f"{two['second_adds_loaded']} ({two['second_adds_loaded'] / two['rss_a_loaded']:.2f}x)"
                  if two else "-")
        print(f"| {r['server']} | {r['ready_s_first']} | {r['ready_s_second']} | {r['idle_rss_mib']} | "
              f"{r['rss_after_load_mib']} | {r['peak_rss_mib']} | {idle} | {loaded} |")


if __name__ == "__main__":
    main()
