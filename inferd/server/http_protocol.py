"""uvicorn's httptools protocol with one write per response.

uvicorn writes a response's status line and headers on `http.response.start` and its body on
`http.response.body`: two write syscalls, and on loopback two TCP segments the client reads separately, for
every small response. For the OIP scoring route the two writes were a third of the event loop's CPU per request.
Here the connection's writes are held until the end of the event loop's current pass and then written as one:
a response sent in one pass goes out in one write; a stream's chunks still go out pass by pass (a pass is
microseconds, so nothing waits for a timer). Closing the connection first writes what is held.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn's default (h11) protocol serves, writes unchanged
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class PassWriter:
    """A transport whose writes are joined and written at the end of the loop's pass. Everything else is the
    wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._held)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:

    class OneWriteHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(PassWriter(transport, self.loop))  # type: ignore[arg-type]


def protocol_class() -> type[asyncio.Protocol] | str:
    """What to pass as uvicorn.Config(http=...): the one-write httptools protocol, or "auto" without httptools."""
    return "auto" if HttpToolsProtocol is None else OneWriteHttpToolsProtocol
