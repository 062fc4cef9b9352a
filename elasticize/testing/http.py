"""A loopback HTTP server with byte-range support that counts what it serves, for tests and benchmarks
of remote partial loading (:mod:`elasticize.fileformat.source`).

::

    from elasticize.testing.http import RangeServer

    with RangeServer(folder) as srv:                 # 127.0.0.1, a free port, a daemon thread
        elasticize.load_subnet(f"{srv.url}/m.safetensors", "small")
        print(srv.requests, srv.served)              # GET requests, body bytes sent

It serves the files of one folder over the standard library's :mod:`http.server` (HTTP/1.1,
kept-alive connections) and answers ``Range: bytes=a-b`` with ``206`` and ``Content-Range``, and
``Range: bytes=a-b,c-d,...`` with one ``multipart/byteranges`` body (RFC 7233, section 4.1), parts
in the order asked. The first path segment picks a misbehaving server, for the error paths:

* ``/norange/NAME``: ignores ``Range`` (``200`` and the whole file), as a plain static server does;
* ``/trunc/NAME``: sends half of each range's body, then closes the connection;
* ``/single/NAME``: honours one range but answers several with ``200`` and the whole file (a server
  without multi-range support, or over its limit, like Apache's ``MaxRanges``);
* ``/onepart/NAME``: answers several ranges with a single ``206`` part, the first range only;
* ``/badmulti/NAME``: answers several ranges with a ``multipart/byteranges`` body whose second part
  says 10 bytes more than it holds.

A missing file is ``404``. The server counts requests, ranges, the file bytes it sends (``served``)
and every byte it writes (``wire``: status lines, headers, multipart framing and data).
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["RangeServer"]

_BOUNDARY = "elasticize-byteranges"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each response waits for the client's delayed ACK (40 ms)
    server: "RangeServer"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def flush_headers(self) -> None:  # the status line and headers: counted on the wire
        self.server.count(wire=len(b"".join(getattr(self, "_headers_buffer", []))))
        super().flush_headers()

    def _send(self, status: int, body: bytes, headers: dict[str, str], payload: int = 0, cut: bool = False) -> None:
        """One answer: ``payload`` of the ``body`` bytes are the file's; ``cut`` sends half the body and closes."""
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if cut:
            self.close_connection, body = True, body[:len(body) // 2]
        self.server.count(served=min(payload, len(body)), wire=len(body))
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        mode, _, name = self.path.lstrip("/").rpartition("/")
        path = self.server.root / name
        self.server.count(requests=1)
        if not path.is_file():
            return self._send(404, b"", {})
        rng = self.headers.get("Range")
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if rng is None or mode == "norange":
                return self._send(200, f.read(), {}, size)
            spans = []
            for part in rng.removeprefix("bytes=").split(","):
                a, b = (int(x) for x in part.strip().split("-"))
                spans.append((a, min(b, size - 1)))
            if len(spans) > 1 and mode == "single":
                return self._send(200, f.read(), {}, size)
            self.server.count(ranges=len(spans))
            datas = []
            for a, b in spans[:1] if mode == "onepart" else spans:
                f.seek(a)
                datas.append(f.read(b + 1 - a))
        n = sum(map(len, datas))
        if len(datas) == 1:
            a, b = spans[0]
            body = datas[0]
            return self._send(206, body, {"Content-Range": f"bytes {a}-{b}/{size}"}, n, mode == "trunc" and n > 8)
        parts = []
        for i, ((a, b), data) in enumerate(zip(spans, datas)):
            said = f"{a}-{b + 10}" if mode == "badmulti" and i == 1 else f"{a}-{b}"
            parts.append(f"--{_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
                         f"Content-Range: bytes {said}/{size}\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()
        self._send(206, body, {"Content-Type": f"multipart/byteranges; boundary={_BOUNDARY}"}, n, mode == "trunc")


class RangeServer(ThreadingHTTPServer):
    """The files of ``root`` served on ``127.0.0.1`` (a free port) from a daemon thread, while in a
    ``with`` block.

    Args:
        root: the folder served; ``GET /NAME`` (or ``/MODE/NAME``, see the module) is ``root / NAME``.

    Attributes:
        url: ``http://127.0.0.1:PORT`` (no trailing slash).
        requests: ``GET`` requests answered since the start or the last :meth:`reset`.
        ranges: byte ranges served since then (a multi-range request counts each range).
        served: bytes of the served files sent since then (the ranges' data).
        wire: all bytes sent since then: status lines, headers, multipart boundaries and part
            headers, and the data.
    """

    daemon_threads = True

    def __init__(self, root: str | Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.lock = Path(root), threading.Lock()
        self.requests = self.ranges = self.served = self.wire = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that hangs up: quiet
        pass

    def reset(self) -> None:
        """Set the counters to 0."""
        with self.lock:
            self.requests = self.ranges = self.served = self.wire = 0

    def count(self, **added: int) -> None:
        """Add to the counters (from the handler threads)."""
        with self.lock:
            for k, v in added.items():
                setattr(self, k, getattr(self, k) + v)

    def __enter__(self) -> "RangeServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
