"""The answer to a multi-range HTTP request, ``Range: bytes=a-b,c-d,...``: a ``multipart/byteranges``
body (RFC 7233, section 4.1 and appendix A; RFC 2046, section 5.1.1 for the boundaries), read as a
stream and checked part by part.

A part is ``--BOUNDARY CRLF``, its header lines, an empty line, exactly the bytes its
``Content-Range: bytes FIRST-LAST/SIZE`` names, then ``CRLF``; the body ends with ``--BOUNDARY--``.
Each part's length comes from its ``Content-Range`` (checked against the file's size and against
the bytes read), never from searching the data for the boundary, so binary data cannot end a part
early. The standard library's :mod:`email` parser is not used: it splits on boundary lines found
in the data and rewrites line endings, which binary tensors do not survive.
"""

from __future__ import annotations

import re
from typing import BinaryIO

__all__ = ["read_byteranges", "boundary_of", "CONTENT_RANGE"]

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_BOUNDARY = re.compile(r'multipart/byteranges\s*;(?:.*;)?\s*boundary=("?)([^";]{1,70})\1\s*(?:;.*)?', re.I)
_MAX_LINE = 1024  # a part's header line; longer is not a byteranges answer
_MAX_HEADERS = 16


def boundary_of(content_type: str | None) -> str | None:
    """The boundary of a ``multipart/byteranges`` ``Content-Type``; None for any other type."""
    m = _BOUNDARY.fullmatch((content_type or "").strip())
    return m.group(2) if m else None


def read_byteranges(body: BinaryIO, boundary: str, size: int, name: str) -> list[tuple[int, bytes]]:
    """The parts of a ``multipart/byteranges`` body, as ``(first byte, bytes)`` in the order sent.

    Args:
        body: the response body, read with ``readline`` and ``read``.
        boundary: the boundary from the response's ``Content-Type`` (:func:`boundary_of`).
        size: the file's size in bytes; every part must say it and lie inside it.
        name: the file's name, for messages.

    Raises:
        ValueError: the body is not a well-formed ``multipart/byteranges`` answer (a missing or wrong
            boundary, a part without a valid ``Content-Range``, a part of another file size, a part
            cut short, or more data than the part says).
    """
    delim, end = f"--{boundary}".encode(), f"--{boundary}--".encode()

    def bad(why: str) -> ValueError:
        return ValueError(f"{name}: the server's multipart/byteranges answer is malformed ({why}); it does not "
                          "serve multiple byte ranges correctly: use another server, or download the file and "
                          "pass its path")

    line = body.readline(_MAX_LINE)
    while line in (b"\r\n", b"\n"):  # an empty preamble
        line = body.readline(_MAX_LINE)
    parts: list[tuple[int, bytes]] = []
    while True:
        if line.rstrip(b"\r\n") == end:
            if not parts:
                raise bad("no parts")
            return parts
        if line.rstrip(b"\r\n") != delim:
            raise bad(f"expected the boundary, got {line[:40]!r}")
        rng = None
        for _ in range(_MAX_HEADERS + 1):
            line = body.readline(_MAX_LINE)
            if line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                raise bad("a part's headers are cut short or too long")
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == "content-range":
                rng = CONTENT_RANGE.fullmatch(value.strip())
                if rng is None:
                    raise bad(f"Content-Range {value.strip()[:60]!r}")
        else:
            raise bad(f"a part has more than {_MAX_HEADERS} header lines")
        if rng is None:
            raise bad("a part has no Content-Range")
        a, b, total = int(rng.group(1)), int(rng.group(2)), rng.group(3)
        if total != str(size) or not a <= b < size:
            raise bad(f"a part says bytes {a}-{b}/{total} of a file of {size} bytes")
        data = body.read(b + 1 - a)
        if len(data) != b + 1 - a:
            raise bad(f"the part of bytes {a}-{b} is cut short ({len(data)} of {b + 1 - a} bytes)")
        if body.readline(_MAX_LINE) != b"\r\n":
            raise bad(f"the part of bytes {a}-{b} holds more bytes than its Content-Range says")
        parts.append((a, data))
        line = body.readline(_MAX_LINE)
