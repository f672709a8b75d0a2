"""CPU time (user + system, from /proc/PID/stat) of a process tree, by process title: what each of Ray Serve's
processes (HTTP proxy, ingress, replica, raylet, GCS, ...) burns during a load. Linux only (reads /proc)."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (t / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += _children(p)
    return seen


def name_of(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):  # ray::ProxyActor, ray::ServeReplica:inferd:InferdReplica; Ray appends the method
        return first.split()[0].split(".")[0]  # running now (".handle_request_with_rejection"): not part of the name
    for a in args[:3]:
        s = a.decode(errors="replace")
        base = os.path.basename(s)
        if base in ("raylet", "gcs_server"):
            return base
        if s.endswith(".py"):
            return base
    return " ".join(a.decode(errors="replace") for a in args[:4])[:60]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def snapshot(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (process title, CPU seconds so far) over the tree."""
    return {p: (name_of(p), cpu_seconds(p)) for p in tree(root)}


def delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """process title -> CPU seconds used between the snapshots, summed over the processes with that title."""
    out: dict[str, float] = {}
    for pid, (name, sec) in after.items():
        name = before.get(pid, (name, 0.0))[0]
        out[name] = out.get(name, 0.0) + sec - before.get(pid, (name, 0.0))[1]
    return out
