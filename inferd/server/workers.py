"""`inferd serve --workers N`: N engine worker processes forked from one parent that holds the runtime.

The parent imports torch and the server stack, freezes the garbage collector's view of those objects (gc.freeze,
so later collections in the workers do not write to their pages), claims the port, and forks the workers one
after another: worker k+1 is forked once worker k has loaded its models, so only the first builds the repack and
encoder caches and the load peak is one worker's. Each worker is an ordinary `inferd serve` process (its own
engine, KV cache and models; weights map the shared cache and GGUF files) that starts accepting connections once
its models are loaded: on Linux on its own SO_REUSEPORT socket (the kernel spreads connections evenly over the
workers by a hash of the client's address), elsewhere on the parent's listening socket, shared. The pages of the runtime (libtorch's static data, the
imported modules' Python objects) stay shared copy-on-write: a second worker adds ~0.2x of the first's RSS, where
an independent `inferd serve` adds ~0.67x (docs/benchmarks.md).

The parent runs no torch op before forking, so no OpenMP pool exists yet (libgomp's pool, once started, does not
survive a fork; numpy's OpenBLAS pool, started by its import, handles fork itself). It supervises: SIGTERM/SIGINT to the parent become SIGTERM to every worker (each drains its in-flight requests as
a single-process server does; a second signal stops them at once; workers ignore SIGINT, so a terminal's Ctrl-C,
which reaches the whole process group, counts once), a worker that dies is forked again from the
parent, and start-up failures end the parent with the workers' one-line error.

Each worker answers /metrics for the whole server: it reads the other workers' metrics from their unix sockets
(in a private directory of the parent's) and shows them with a `worker` label through
`inferd.cluster.metrics_merge` (what the Ray ingress uses for replicas). Responses carry `x-inferd-worker: K`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.errors import InferdError
from inferd.server.ports import address_family, check_port_free

log = logging.getLogger("inferd.workers")

WORKER_HEADER = "x-inferd-worker"
MAX_START_FAILURES = 3  # a worker that fails this many times in a row before it is ready ends the server
METRICS_TIMEOUT_S = 2.0  # a worker that does not hand over its metrics in this time is left out of /metrics
STOP_GRACE_S = 15.0  # beyond --shutdown-timeout, before the parent kills a worker that has not exited
SIGNALS = (signal.SIGTERM, signal.SIGINT)
QUICK_CRASH_S = 60.0  # a worker that dies sooner than this after its start is restarted later each time
MAX_RESTART_DELAY_S = 30.0
UNIX_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes (Linux), 104 (BSD/macOS)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help="engine worker processes behind the one --host:--port, forked from a parent that holds "
                        "the Python and torch runtime, so each further worker adds ~0.2x of the first's memory; "
                        "each has its own engine, KV cache and prefix cache and max(1, cores // N) threads unless "
                        "--threads is given (default 1: one process)")


def worker_threads(args: argparse.Namespace, cores: int | None = None) -> int:
    """Torch/kernel threads of each worker: --threads, else the cores shared out (at least one each)."""
    if args.threads:
        return args.threads
    return max(1, (cores or _cores()) // args.workers)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_worker_args(args: argparse.Namespace, uses_ray: bool) -> None:
    """One-line errors for what --workers cannot be combined with (before anything is imported or forked)."""
    if args.workers < 1:
        raise InferdError(f"--workers must be at least 1, got {args.workers}")
    if args.workers == 1:
        return
    if uses_ray:
        raise InferdError("--workers and --replicas/--ray-address are two ways to run several engines: give one "
                          "(--workers: forked processes on this machine; --replicas: Ray Serve)")
    if str(args.device).startswith("cuda"):
        raise InferdError("--workers runs CPU engines that share one forked runtime (CUDA does not survive a fork); "
                          "on a GPU use --replicas, or --device cpu")
    if not hasattr(os, "fork"):
        raise InferdError("--workers needs fork(), which this platform does not have")


# ---- the worker side ----------------------------------------------------------------------------------------------
@dataclass
class WorkerHooks:
    """What a worker adds to an ordinary `inferd serve` process (passed to `cmd_serve`)."""

    index: int
    count: int
    rundir: Path
    ready_fd: int
    address: tuple[str, int]
    shared: socket.socket | None  # the parent's listening socket where SO_REUSEPORT does not balance
    _reported: bool = False
    _last: dict[int, str] = field(default_factory=dict)  # each other worker's last metrics text

    def listen(self) -> list[socket.socket]:
        """This worker's listening socket: on Linux its own SO_REUSEPORT socket on the port (the kernel spreads new
        connections evenly over the workers' sockets, by a hash of the client's address and port), elsewhere the
        parent's socket, shared (the first worker to accept gets the connection, which can be very uneven)."""
        if self.shared is not None:
            return [self.shared]
        try:
            return [reuseport_socket(*self.address, listen=True)]
        except OSError as exc:
            raise InferdError(f"worker {self.index} cannot listen on {self.address[0]}:{self.address[1]}: "
                              f"{os.strerror(exc.errno) if exc.errno else exc}") from exc

    def metrics_path(self, k: int) -> Path:
        return self.rundir / f"worker-{k}.sock"

    def attach(self, app: Any, state: Any) -> None:
        """The header, the merged /metrics and this worker's metrics socket."""
        from prometheus_client import generate_latest

        def own_metrics() -> bytes:
            return generate_latest(state.metrics.registry)

        app.add_middleware(WorkerMiddleware, hooks=self, own_metrics=own_metrics)
        server: list[asyncio.AbstractServer] = []

        async def serve_metrics(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                writer.write(own_metrics())
                await writer.drain()
            writer.close()

        async def start() -> None:
            path = self.metrics_path(self.index)
            path.unlink(missing_ok=True)  # the socket of the worker this one replaces
            try:
                server.append(await asyncio.start_unix_server(serve_metrics, path=str(path)))
            except OSError as exc:
                self.failed(f"worker {self.index} cannot open its metrics socket {path}: {exc.strerror or exc}")
                raise
            self._report(b"R")  # models loaded, serving: the parent may fork the next worker

        async def stop() -> None:
            for s in server:
                s.close()
            self.metrics_path(self.index).unlink(missing_ok=True)

        app.on_event("startup")(start)
        app.on_event("shutdown")(stop)

    async def merged_metrics(self, own: bytes) -> str:
        """Every worker's samples with a `worker` label (separate series, so a restarted worker's counters reset
        alone, which Prometheus's rate() handles, instead of making a summed counter drop). A worker that does not
        answer in time is shown with its last metrics; one that is gone (restarting) is left out."""
        from inferd.cluster.metrics_merge import merge_prometheus

        others = [k for k in range(self.count) if k != self.index]
        got = await asyncio.gather(*(self._read_metrics(k) for k in others))
        texts, labels = [own.decode()], [{"worker": str(self.index)}]
        for k, text in zip(others, got):
            if text is not None:
                texts.append(text)
                labels.append({"worker": str(k)})
        return merge_prometheus(texts, count=("inferd_workers", "Worker processes whose metrics are shown here"),
                                text_labels=labels)

    async def _read_metrics(self, k: int) -> str | None:
        async def read() -> bytes:
            reader, writer = await asyncio.open_unix_connection(str(self.metrics_path(k)))
            try:
                return await reader.read()
            finally:
                writer.close()

        try:
            text = (await asyncio.wait_for(read(), METRICS_TIMEOUT_S)).decode()
        except asyncio.TimeoutError:
            return self._last.get(k)  # alive but busy: its last metrics (counters never go back)
        except OSError:
            self._last.pop(k, None)
            return None  # not started yet or restarting: its series are absent until it is back
        self._last[k] = text
        return text

    def failed(self, message: str) -> None:
        self._report(b"E" + message.encode())

    def _report(self, msg: bytes) -> None:
        if self._reported:
            return
        self._reported = True
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, msg)
            os.close(self.ready_fd)


class WorkerMiddleware:
    """ASGI: `x-inferd-worker` on every response; GET /metrics answered with every worker's metrics."""

    def __init__(self, app: Callable, hooks: WorkerHooks, own_metrics: Callable[[], bytes]):
        self.app, self.hooks, self.own_metrics = app, hooks, own_metrics
        self.header = (WORKER_HEADER.encode(), str(hooks.index).encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            from fastapi.responses import PlainTextResponse
            from prometheus_client import CONTENT_TYPE_LATEST

            text = await self.hooks.merged_metrics(self.own_metrics())
            resp = PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST,
                                     headers={WORKER_HEADER: str(self.hooks.index)})
            return await resp(scope, receive, send)

        async def send_with_header(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), self.header]}
            await send(msg)

        await self.app(scope, receive, send_with_header)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the parent dies (even by SIGKILL), so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _worker_main(serve_one: Callable[..., int], args: argparse.Namespace, hooks: WorkerHooks, parent: int) -> None:
    code = 1
    try:
        # SIGTERM comes from the parent (once: drain; twice: stop now). SIGINT is ignored: a terminal's Ctrl-C
        # goes to the whole process group, and the parent passes it on as SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        _die_with_parent(parent)
        fmt = f"%(asctime)s %(levelname)s %(name)s [worker {hooks.index}]: %(message)s"
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter(fmt))
        args.threads = worker_threads(args)
        code = serve_one(args, worker=hooks) or 0
    except InferdError as exc:
        hooks.failed(str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        traceback.print_exc()
        hooks.failed(f"worker {hooks.index} crashed: {type(exc).__name__}: {exc}")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---- the parent ---------------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    index: int
    pid: int = 0
    ready: bool = False
    pipe: int = -1
    error: str = ""
    start_failures: int = 0
    not_before: float = 0.0
    started: float = 0.0
    quick_crashes: int = 0  # crashes in a row, each within QUICK_CRASH_S of its start: the restart delay doubles


@dataclass
class Supervisor:
    args: argparse.Namespace
    address: tuple[str, int]
    shared: socket.socket | None
    rundir: Path
    serve_one: Callable[..., int]
    reservation: socket.socket | None = None  # the parent's hold on the port (closed in workers that do not use it)
    workers: list[_Worker] = field(default_factory=list)
    signals: int = 0
    fatal: str = ""
    ever_ready: bool = False

    def __post_init__(self) -> None:
        self.workers = [_Worker(k) for k in range(self.args.workers)]
        self.parent = os.getpid()

    def on_signal(self, _sig: int, _frame: Any) -> None:
        # only counted here: the supervisor's loops pass each one on (first: workers drain; second: they stop at
        # once, as single-process serve), so no handler ever races a fork or a waitpid over a worker's pid
        self.signals += 1

    def _kill_all(self, sig: int) -> None:
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    def run(self) -> int:
        while not self.signals and not self.fatal:
            self._reap()
            if self.signals or self.fatal:
                break
            if not any(w.pid and not w.ready for w in self.workers):  # one worker loads at a time
                now = time.monotonic()
                nxt = next((w for w in self.workers if not w.pid and w.not_before <= now), None)
                if nxt is not None:
                    self._fork(nxt)
            self._poll_pipes(0.2)
        self._stop_all()
        if self.fatal:
            raise InferdError(self.fatal)
        return 0

    def _fork(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        hooks = WorkerHooks(w.index, len(self.workers), self.rundir, wfd, self.address, self.shared)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # no parent handler may run in the child
        pid = os.fork()
        if pid == 0:
            os.close(r)
            for other in self.workers:
                if other.pipe >= 0:
                    os.close(other.pipe)
            if self.reservation is not None and self.shared is None:
                self.reservation.close()  # the worker listens on its own SO_REUSEPORT socket
            _worker_main(self.serve_one, self.args, hooks, self.parent)
        w.pid, w.ready, w.pipe, w.error, w.started = pid, False, r, "", time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(wfd)
        log.info("worker %d started (pid %d)", w.index, pid)

    def _poll_pipes(self, timeout: float) -> None:
        fds = [w.pipe for w in self.workers if w.pipe >= 0]
        try:
            readable, _, _ = select.select(fds, [], [], timeout) if fds else ([], [], [])
        except InterruptedError:
            return
        if not fds:
            time.sleep(timeout)
        for w in self.workers:
            if w.pipe in readable:
                self._read_pipe(w)

    def _read_pipe(self, w: _Worker) -> None:
        try:
            data = os.read(w.pipe, 1 << 16)
        except OSError:
            data = b""
        if data.startswith(b"R"):
            w.ready, w.start_failures, self.ever_ready = True, 0, True
            log.info("worker %d ready (pid %d)", w.index, w.pid)
            if all(x.ready for x in self.workers):
                log.info("all %d workers ready", len(self.workers))
        elif data.startswith(b"E"):
            w.error = data[1:].decode(errors="replace")
        os.close(w.pipe)
        w.pipe = -1

    def _reap(self) -> None:
        for w in self.workers:
            if not w.pid:
                continue
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = w.pid, 0
            if pid == 0:
                continue
            if w.pipe >= 0:
                self._read_pipe(w)  # a last message (the error) and EOF
            code = os.waitstatus_to_exitcode(status)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            was_ready, w.pid, w.ready = w.ready, 0, False
            if self.signals:
                continue
            if was_ready:
                now = time.monotonic()
                w.quick_crashes = w.quick_crashes + 1 if now - w.started < QUICK_CRASH_S else 0
                delay = min(MAX_RESTART_DELAY_S, 2.0 ** w.quick_crashes)
                log.warning("worker %d %s; starting it again in %.0f s", w.index, how, delay)
                w.not_before = now + delay
                continue
            w.start_failures += 1
            why = w.error or f"worker {w.index} {how} while loading"
            if not self.ever_ready or w.start_failures >= MAX_START_FAILURES:
                self.fatal = why if not self.ever_ready else (
                    f"worker {w.index} failed to start {w.start_failures} times in a row: {why}")
                return
            log.warning("worker %d failed to start (%s); trying again", w.index, why)
            w.not_before = time.monotonic() + 2.0 * w.start_failures

    def _stop_all(self) -> None:
        grace = self.args.shutdown_timeout + STOP_GRACE_S
        deadline = time.monotonic() + grace
        forwarded = 0
        while any(w.pid for w in self.workers):
            if max(self.signals, 1) > forwarded:  # a fatal error stops them as one signal would
                forwarded = max(self.signals, 1)
                self._kill_all(signal.SIGTERM)
            for w in self.workers:
                if w.pid:
                    with contextlib.suppress(ChildProcessError):
                        if os.waitpid(w.pid, os.WNOHANG)[0] == 0:
                            continue
                    w.pid = 0
            if time.monotonic() > deadline:
                log.warning("workers still running %.0f s after SIGTERM: killing them", grace)
                self._kill_all(signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
        for w in self.workers:
            if w.pipe >= 0:
                os.close(w.pipe)
                w.pipe = -1


def _import_runtime() -> None:
    """What every worker needs, imported once here so its pages are shared (no torch op: no OpenMP pool)."""
    import fastapi  # noqa: F401
    import torch  # noqa: F401
    import uvicorn  # noqa: F401

    import inferd.engine.async_engine  # noqa: F401
    import inferd.engine.llm_engine  # noqa: F401
    import inferd.server.app  # noqa: F401
    import inferd.server.serving_embeddings  # noqa: F401


BALANCED = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuseport_socket(host: str, port: int, listen: bool) -> socket.socket:
    """SO_REUSEPORT; a listening one also SO_REUSEADDR (as uvicorn's own), the parent's reservation not, so that
    another server's probe (claim_port) cannot bind beside it."""
    sock = socket.socket(address_family(host, port))
    if listen:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def claim_port(host: str, port: int) -> tuple[socket.socket, tuple[str, int]]:
    """The parent's hold on --host:--port: a listening socket the workers share, or (Linux) a bound, never
    listening SO_REUSEPORT socket that keeps the port for the workers' own sockets. Either way a port that
    another server holds is an error here, not a silently shared port."""
    try:
        if not BALANCED:
            sock = socket.create_server((host, port), family=address_family(host, port), backlog=2048)
            sock.set_inheritable(True)
            return sock, sock.getsockname()[:2]
        port = check_port_free(host, port)  # without SO_REUSEPORT: fails if anything holds the port
        sock = reuseport_socket(host, port, listen=False)
        return sock, (host, port)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InferdError(f"cannot listen on {host}:{port}: {why}") from exc


def _rundir() -> Path:
    """A private directory for the workers' metrics sockets, short enough for an AF_UNIX path."""
    base = None if len(tempfile.gettempdir()) < UNIX_PATH_MAX - 40 else "/tmp"
    return Path(tempfile.mkdtemp(prefix="inferd-workers-", dir=base))


def serve_workers(args: argparse.Namespace, serve_one: Callable[..., int]) -> int:
    """The parent of `inferd serve --workers N` (N > 1): `serve_one(args, worker=hooks)` runs in each worker."""
    if args.device == "auto":
        import torch

        if torch.cuda.is_available():
            raise InferdError("--workers runs CPU engines (CUDA does not survive a fork) and this machine has a GPU: "
                              "give --device cpu, or use --replicas")
    _import_runtime()
    sock, address = claim_port(args.host, args.port)
    rundir = _rundir()
    gc.collect()
    gc.freeze()
    from inferd.hardware import release_free_memory

    release_free_memory()  # the imports' freed heap goes back before the fork, not once per worker (malloc_trim)
    sup = Supervisor(args, address, None if BALANCED else sock, rundir, serve_one, reservation=sock)
    old = {sig: signal.signal(sig, sup.on_signal) for sig in SIGNALS}
    print(f"inferd serving on http://{args.host}:{address[1]}/v1 with {args.workers} workers, "
          f"{worker_threads(args)} threads each (loading models...)", file=sys.stderr, flush=True)
    try:
        return sup.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        sock.close()
        shutil.rmtree(rundir, ignore_errors=True)
