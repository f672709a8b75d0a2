"""The one-write HTTP protocol: writes made in one pass of the event loop reach the socket as one write."""

from __future__ import annotations

import asyncio

from inferd.server import http_protocol
from inferd.server.http_protocol import PassWriter


class FakeTransport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


def test_writes_of_one_pass_are_one_write_and_close_flushes_first():
    async def go():
        t = FakeTransport()
        w = PassWriter(t, asyncio.get_running_loop())
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        w.write(b"ok")
        assert t.writes == [] and w.get_write_buffer_size() == 40
        await asyncio.sleep(0)
        assert t.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        w.writelines([b"a", b"b"])
        await asyncio.sleep(0)
        w.write(b"c")  # a later pass: its own write
        await asyncio.sleep(0)
        assert t.writes[1:] == [b"ab", b"c"]
        w.write(b"bye")
        w.close()  # what is held goes out before the close
        assert t.writes[-1] == b"bye" and t.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing held
        assert len(t.writes) == 4
        assert w.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's
        t2 = FakeTransport()
        w2 = PassWriter(t2, asyncio.get_running_loop())
        w2.write(b"dropped")
        w2.abort()
        await asyncio.sleep(0)
        assert t2.writes == [] and t2.aborted

    asyncio.run(go())


def test_protocol_class_for_uvicorn():
    cls = http_protocol.protocol_class()
    if http_protocol.HttpToolsProtocol is None:
        assert cls == "auto"
    else:
        assert issubclass(cls, http_protocol.HttpToolsProtocol)
