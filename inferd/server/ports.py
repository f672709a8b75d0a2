"""Checking that --host:--port can be served before anything is started on it (forked workers, Ray's ingress)."""

from __future__ import annotations

import socket

from inferd.errors import InferdError


def address_family(host: str, port: int) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for this host (a name, an IPv4 or an IPv6 address)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as exc:
        raise InferdError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def check_port_free(host: str, port: int) -> int:
    """The port, bound once and let go (SO_REUSEADDR, as uvicorn binds: a port in TIME_WAIT is free): a one-line
    error if anything holds it. Port 0 gives the free port the system picked."""
    try:
        with socket.socket(address_family(host, port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as exc:
        raise InferdError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
