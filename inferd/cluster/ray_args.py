"""`inferd serve` flags for scale-out on Ray Serve (registered on the serve parser; Ray is imported only when
--replicas or --ray-address is given)."""

from __future__ import annotations

import argparse
import os

from inferd.cluster.router import POLICIES, RouterConfig
from inferd.errors import InferdError


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out on Ray Serve (needs the [ray] extra)")
    g.add_argument("--replicas", type=int, default=None,
                   help="serve through Ray Serve with this many engine replicas (one engine each) behind an "
                        "OpenAI-compatible ingress; the initial count when autoscaling")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local Ray "
                        "bound to 127.0.0.1")
    g.add_argument("--routing", choices=list(POLICIES), default="prefix",
                   help="how the ingress picks a replica: prefix (the replica that holds the prompt's prefix, "
                        "unless it is over the imbalance bound), least-loaded (power of two choices), round-robin")
    g.add_argument("--imbalance-abs", type=int, default=RouterConfig.imbalance_abs,
                   help="prefix routing: ongoing requests above the least-loaded choice before falling back")
    g.add_argument("--imbalance-rel", type=float, default=RouterConfig.imbalance_rel,
                   help="prefix routing: ... and this many times its load")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=16.0,
                   help="autoscaling: ongoing requests per replica Ray Serve aims for")
    g.add_argument("--upscale-delay", type=float, default=30.0, metavar="S",
                   help="autoscaling: seconds the load must stay above the target before replicas are added")
    g.add_argument("--downscale-delay", type=float, default=600.0, metavar="S",
                   help="autoscaling: seconds the load must stay below the target before replicas are removed")
    g.add_argument("--autoscale-look-back", type=float, default=30.0, metavar="S",
                   help="autoscaling: window (seconds) over which ongoing requests are averaged")
    g.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests a replica takes at once; more wait at the ingress (up to --max-queue, then 503)")
    g.add_argument("--replica-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per replica (ray_actor_options num_cpus); also its torch threads "
                        "unless --threads is given")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    g.add_argument("--ray-ingress", choices=["auto", "separate"], default="auto",
                   help="auto: a fixed single replica is its own HTTP ingress (with --ray-http direct it serves "
                        "HTTP itself, no hop; behind Serve's proxy, one hop); separate: always a separate ingress "
                        "deployment in front of the replicas (one hop more; what prefix routing over several "
                        "replicas needs)")
    g.add_argument("--ray-http", choices=["auto", "direct", "proxy"], default="auto",
                   help="who answers HTTP on --host:--port: direct (Ray Serve's direct ingress: the ingress replica "
                        "runs the HTTP server itself, no proxy hop; needs a Ray that inferd starts), proxy (Serve's "
                        "HTTP proxy, which forwards to the ingress replica); auto: direct for a local Ray, proxy with "
                        "--ray-address")


def free_tcp_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uses_ray(args: argparse.Namespace) -> bool:
    return args.replicas is not None or args.ray_address is not None or args.min_replicas is not None


def check_ray_args(args: argparse.Namespace) -> None:
    """Flag errors as one-line messages before Ray starts."""
    n = args.replicas if args.replicas is not None else (args.min_replicas or 1)
    if n < 1:
        raise InferdError(f"--replicas must be at least 1, got {n}")
    lo, hi = args.min_replicas, args.max_replicas
    if (lo is None) != (hi is None):
        raise InferdError("give --min-replicas and --max-replicas together to autoscale")
    if lo is not None and not 0 <= lo <= n <= hi:
        raise InferdError(f"autoscaling needs 0 <= --min-replicas <= --replicas <= --max-replicas; got {lo}, {n}, "
                          f"{hi}")
    if min(args.upscale_delay, args.downscale_delay) < 0 or args.autoscale_look_back <= 0:
        raise InferdError("--upscale-delay and --downscale-delay must be >= 0, --autoscale-look-back positive")
    if args.target_ongoing_requests <= 0 or args.max_ongoing_requests < 1:
        raise InferdError("--target-ongoing-requests must be positive and --max-ongoing-requests at least 1")
    if getattr(args, "ray_http", "auto") == "direct" and args.ray_address:
        raise InferdError("--ray-http direct needs a local Ray (inferd sets the replicas' environment); with "
                          "--ray-address use --ray-http proxy")
    if args.replica_cpus <= 0:
        raise InferdError("--replica-cpus must be positive")
    try:
        RouterConfig(policy=args.routing, imbalance_abs=args.imbalance_abs, imbalance_rel=args.imbalance_rel)
    except ValueError as exc:
        raise InferdError(str(exc)) from exc


def local_ray_env() -> None:
    """Environment for a Ray that inferd starts itself, set before Ray is imported (its processes inherit it):
    single-node and loopback-only (Ray otherwise turns 127.0.0.1 into the machine's external address and
    advertises it), and proxy start-up checks that tolerate a busy CPU-only host (Serve's 5 s readiness check
    restarts the HTTP proxy in a loop when the cores are saturated, the "hangs at start" of CPU-only clusters).
    Values already in the environment win."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    for k, v in THROUGHPUT_ENV.items():
        os.environ.setdefault(k, v)


# Ray Serve's own switch for its fast request path (Ray >= 2.50): user code and the request router on the replica's
# event loop instead of extra threads/loops, handle calls and stream items over gRPC instead of the object store,
# buffered access logs. Each streamed token crosses a handle hop per Ray process on its path, so on a small CPU host
# this is most of Serve's overhead (benchmarks/ray_overhead.py). Direct ingress (the ingress replica serving HTTP
# itself) is off here and switched on with its port settings by `ray_serve.direct_ingress_env` (--ray-http).
# Serve's controller loop every 0.5 s instead of 0.1 s: an idle local Ray took 137 ms of CPU per second with one
# replica, 100 with this (the controller 35 -> 15 ms/s, the GCS it polls 20 -> 9), on a 2-core host ~2% of it;
# replica restarts and autoscaling decisions wait at most 0.4 s longer (health checks run every 2 s anyway). Start-up
# to a served /v1/models on the loaded host, alternating: 0.1 s 36.6 / 22.2 / 30.0 / 24.9 s, 0.5 s 36.6 / 35.2 /
# 31.4 / 21.9 s (within that host's noise; a deployment takes a few loop ticks, so at most a few seconds).
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                  "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
