"""Live autoscaling on Ray Serve: `inferd serve --min-replicas 1 --max-replicas 2 --target-ongoing-requests N` under
a load step (idle, then `--streams` closed-loop streaming chats for `--load-s` seconds, then idle), with the timeline
of ready replicas (the ingress's /health: replicas that loaded their model and report) and of which replica served
each request, so scale-up and scale-down are visible.

    python benchmarks/autoscale_demo.py --out docs/autoscale [--streams 6] [--load-s 60] [--target 2]

Writes timeline.json, timeline.png (with matplotlib) and prints the scale-up and scale-down times. Needs the [ray]
extra and the smollm2-135m package; binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import free_port, stop_server  # noqa: E402

MODEL = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/autoscale")
    ap.add_argument("--streams", type=int, default=6, help="concurrent streams during the load step")
    ap.add_argument("--load-s", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds idle before the load")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--target", type=float, default=2.0, help="--target-ongoing-requests")
    ap.add_argument("--upscale-delay", type=float, default=5.0)
    ap.add_argument("--downscale-delay", type=float, default=15.0)
    ap.add_argument("--look-back", type=float, default=5.0)
    ap.add_argument("--scale-down-timeout", type=float, default=180.0, help="give up waiting for 1 replica after this")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "inferd.cli", "serve", "--model", MODEL, "--port", str(port), "--replicas", "1",
           "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", str(args.target),
           "--upscale-delay", str(args.upscale_delay), "--downscale-delay", str(args.downscale_delay),
           "--autoscale-look-back", str(args.look_back), "--replica-cpus", "1"]
    log = open(out / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    timeline: list[dict] = []
    served: list[dict] = []
    stop_poll = threading.Event()
    load_on = threading.Event()
    inflight = [0]
    lock = threading.Lock()
    t0 = time.monotonic()

    def poll() -> None:
        while not stop_poll.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                h = httpx.get(url + "/health", timeout=5).json()
                with lock:
                    timeline.append({"t": time.monotonic() - t0, "replicas": h.get("replicas", 0),
                                     "replica_ids": h.get("replica_ids", []), "inflight": inflight[0],
                                     "load": load_on.is_set()})
            stop_poll.wait(1.0)

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as c:
            k = 0
            while load_on.is_set():
                body = {"messages": [{"role": "user", "content": f"Stream {i}, request {k}: tell me about bread."}],
                        "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
                with lock:
                    inflight[0] += 1
                start = time.monotonic() - t0
                try:
                    with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        for _ in r.iter_lines():
                            pass
                        rec = {"start": start, "end": time.monotonic() - t0, "status": r.status_code,
                               "replica": r.headers.get("x-inferd-replica")}
                except httpx.HTTPError as exc:
                    rec = {"start": start, "end": time.monotonic() - t0, "status": None, "error": repr(exc)}
                with lock:
                    inflight[0] -= 1
                    served.append(rec)
                k += 1

    marks: dict[str, float | None] = {}
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"inferd serve exited with {proc.returncode} (see {out / 'serve.log'})")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(url + "/health", timeout=2).json().get("replicas") == 1:
                    break
            if time.monotonic() - t0 > 600:
                sys.exit("the first replica was not up after 600 s")
            time.sleep(0.5)
        marks["ready"] = time.monotonic() - t0
        threading.Thread(target=poll, daemon=True).start()
        time.sleep(args.idle_s)
        marks["load_start"] = time.monotonic() - t0
        load_on.set()
        workers = [threading.Thread(target=client, args=(i,)) for i in range(args.streams)]
        for w in workers:
            w.start()
        time.sleep(args.load_s)
        load_on.clear()
        for w in workers:
            w.join()
        marks["load_end"] = time.monotonic() - t0
        deadline = time.monotonic() + args.scale_down_timeout
        while time.monotonic() < deadline:  # idle until the second replica is gone
            time.sleep(1.0)
            with lock:
                now = timeline[-1]["replicas"] if timeline else 2
            if now == 1:
                break
        time.sleep(3.0)
    finally:
        stop_poll.set()
        load_on.clear()
        stop_server(proc)
        log.close()

    def first(cond, after: float) -> float | None:
        return next((p["t"] for p in timeline if p["t"] >= after and cond(p)), None)

    up = first(lambda p: p["replicas"] >= 2, marks["load_start"])
    down = first(lambda p: p["replicas"] == 1, marks["load_end"])
    during = [s for s in served if s.get("replica")]
    summary = {"command": " ".join(cmd[2:]), "marks": marks, "scaled_up_at": up, "scaled_down_at": down,
               "scale_up_s": up - marks["load_start"] if up is not None else None,
               "scale_down_s": down - marks["load_end"] if down is not None else None,
               "requests": len(served), "errors": sum(1 for s in served if s.get("status") != 200),
               "replicas_that_served": sorted({s["replica"] for s in during}),
               "requests_per_replica": {r: sum(1 for s in during if s["replica"] == r)
                                        for r in sorted({s["replica"] for s in during})},
               "loadavg": os.getloadavg(), "timeline": timeline, "served": served}
    (out / "timeline.json").write_text(json.dumps(summary, indent=1))
    with contextlib.suppress(ImportError):
        _plot(out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("timeline", "served")}, indent=1))
    print("\n| t (s) | ready replicas | requests in flight | load on |\n|---|---|---|---|")
    last = None
    for p in timeline:  # the rows where something changed
        row = (p["replicas"], p["inflight"], p["load"])
        if row != last:
            print(f"| {p['t']:.0f} | {p['replicas']} | {p['inflight']} | {'yes' if p['load'] else 'no'} |")
            last = row


def _plot(out: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = s["timeline"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.step([p["t"] for p in tl], [p["replicas"] for p in tl], where="post", label="ready replicas")
    ax.plot([p["t"] for p in tl], [p["inflight"] for p in tl], alpha=0.6, label="requests in flight")
    ax.axvspan(s["marks"]["load_start"], s["marks"]["load_end"], color="grey", alpha=0.15, label="load step")
    ax.set_xlabel("seconds since `inferd serve` was started")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
