"""Start `inferd serve` as a real process on a free port; always stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


@contextlib.contextmanager
def run_server(*args: str, wait: str = "/ready", timeout: float = 120,
               env: dict[str, str] | None = None, cli: tuple[str, ...] = ()) -> Iterator[ServerProcess]:
    """Start `inferd CLI serve ARGS` (CLI: options before the subcommand, e.g. --log-level INFO) and wait until
    GET `wait` answers 200 (wait="" : until it answers at all, e.g. to watch it load)."""
    port = free_port()
    log_path = f"/tmp/inferd-test-server-{port}.log"
    logf = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "inferd.cli", *cli, "serve", "--port", str(port), *args],
                            stdout=logf, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    server = ServerProcess(proc, port, log_path)
    try:
        deadline = time.monotonic() + timeout
        path = wait or "/health"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + path, timeout=1).status_code == 200 or not wait:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        logf.close()
