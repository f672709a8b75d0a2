"""`inferd serve --workers N` (inferd/server/workers.py), black-box with the tiny model: both workers answer on the
one port, /metrics sums them, a killed worker is forked again, SIGTERM drains and stops every worker, and start-up
failures and bad flag combinations are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from inferd.cluster.metrics_merge import merge_prometheus
from tests.server_utils import free_port, run_server

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/task").is_dir(),
                                reason="--workers needs fork() and /proc (Linux)")

HEADER = "x-inferd-worker"


def children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def wait_until(cond, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def workers_seen(url: str, want: set[str], tries: int = 400) -> set[str]:
    """Open new connections until every worker in `want` has answered (the kernel picks who accepts)."""
    seen: set[str] = set()
    for _ in range(tries):
        r = httpx.get(url + "/health", timeout=30)
        assert r.status_code == 200
        seen.add(r.headers[HEADER])
        if want <= seen:
            break
    return seen


def test_two_workers_share_the_port_merge_metrics_restart_and_drain(tiny_hf):
    with run_server("--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05", "--workers", "2", "--device", "cpu",
                    "--shutdown-timeout", "30", cli=("--log-level", "INFO")) as s:
        wait_until(lambda: "all 2 workers ready" in s.log(), what="both workers")
        pids = children(s.proc.pid)
        assert len(pids) == 2
        assert workers_seen(s.url, {"0", "1"}) == {"0", "1"}

        # concurrent requests all succeed, and the merged counter is the total sent to both workers
        body = {"model": tiny_hf.name, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        results: list[httpx.Response] = []

        def send() -> None:
            results.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200] * 8
        assert all(r.headers[HEADER] in ("0", "1") for r in results)
        assert metric(s.url, "inferd_workers ") == 2
        assert metric(s.url, "vllm:request_success_total") == 8
        assert metric(s.url, "vllm:generation_tokens_total") == 32

        # a killed worker is forked again from the parent and serves again
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(children(s.proc.pid) - {victim}) == 2 and s.log().count("all 2 workers ready") == 2,
                   what="the restarted worker")
        assert "was killed by signal 9; starting it again" in s.log()
        assert not alive(victim)
        pids = children(s.proc.pid)
        assert workers_seen(s.url, {"0", "1"}) == {"0", "1"}

        # SIGTERM to the parent while a streamed request is in flight (its first chunk read, the rest read only
        # after the signal, so its response cannot be over before it whatever the host's speed): the stream is
        # delivered whole, then every worker and the parent exit
        first_chunk, signalled = threading.Event(), threading.Event()
        lines: list[str] = []
        status: list[int] = []

        def long_request() -> None:
            with httpx.stream("POST", s.url + "/v1/completions", timeout=120,
                              json={**body, "max_tokens": 400, "ignore_eos": True, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                status.append(r.status_code)
                for line in r.iter_lines():
                    if not line:  # the blank line between server-sent events
                        continue
                    lines.append(line)
                    first_chunk.set()
                    signalled.wait(60)

        t = threading.Thread(target=long_request)
        t.start()
        assert first_chunk.wait(60), "the long request sent nothing"
        s.proc.send_signal(signal.SIGTERM)
        signalled.set()
        t.join(120)
        assert status == [200] and lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 400  # the whole stream came through the drain
        assert s.proc.wait(60) == 0
        assert not any(alive(p) for p in pids), "a worker outlived the parent"


def test_worker_start_failure_is_one_line_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "--log-level", "INFO", "serve", "--model",
                        str(tmp_path / "missing.gguf"),
                        "--workers", "2", "--device", "cpu", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.gguf" in errors[0]
    assert "worker 0 started" in r.stderr and "worker 1 started" not in r.stderr  # the second worker is never forked after the first failed


@pytest.mark.parametrize("flags, says", [(["--workers", "2", "--replicas", "2"], "--replicas"),
                                         (["--workers", "2", "--device", "cuda"], "CUDA"),
                                         (["--workers", "0"], "at least 1")])
def test_incompatible_flags(flags, says):
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "serve", *flags], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and says in r.stderr


def test_a_taken_port_is_a_one_line_error():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "inferd.cli", "serve", "--workers", "2", "--device", "cpu",
                            "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_worker_threads_share_the_cores():
    from argparse import Namespace

    from inferd.server.workers import worker_threads

    assert worker_threads(Namespace(threads=None, workers=2), cores=16) == 8
    assert worker_threads(Namespace(threads=None, workers=4), cores=2) == 1
    assert worker_threads(Namespace(threads=3, workers=4), cores=2) == 3


def test_merge_names_its_count_and_keeps_labelled_series_apart():
    text = "# TYPE c counter\nc_total 2.0\n"
    merged = merge_prometheus([text, text], count=("inferd_workers", "workers"))
    assert "inferd_workers 2" in merged and "c_total 4.0" in merged and "inferd_replicas" not in merged
    labelled = merge_prometheus([text, text.replace("2.0", "3.0")], count=("inferd_workers", "workers"),
                                text_labels=[{"worker": "0"}, {"worker": "1"}])
    assert 'c_total{worker="0"} 2.0' in labelled and 'c_total{worker="1"} 3.0' in labelled
