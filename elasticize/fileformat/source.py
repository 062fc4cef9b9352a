"""Where a file's bytes come from: a local path, an ``http(s)://`` URL (HTTP range requests) or any
fsspec URL (``hf://``, ``s3://``, ``gs://``, ``file://`` ...), read only by byte range.

Readers ask for ``[start, stop)`` byte ranges; :func:`coalesce` merges near ranges into few
requests (spending at most :data:`SLACK` extra bytes), and every answer is checked for its length,
so a truncated download or a server that ignores ``Range`` is an error, never a short tensor.
Everything read is then checked exactly as a local file's bytes are (:mod:`elasticize.fileformat.header`).

``http(s)://`` is read with the standard library's :mod:`http.client`, not fsspec's
``HTTPFileSystem``: that one needs ``aiohttp`` (an asynchronous stack for what is a handful of
sequential GETs), downloads the whole body when a server ignores ``Range`` (the status is checked
here before the body is read), and needs a ``HEAD`` request for the size (here the first answer's
``Content-Range`` gives it). Every other protocol goes through fsspec (``pip install
elasticize[remote]``), which finds the protocol's package (``huggingface_hub`` for ``hf://``,
``s3fs`` for ``s3://``); a missing one is a one-line error that names it.
"""

from __future__ import annotations

import bisect
import http.client
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

from .byteranges import CONTENT_RANGE, boundary_of, read_byteranges

__all__ = ["ByteSource", "open_source", "is_url", "coalesce", "batches", "SLACK", "MAX_RANGES", "MAX_RANGE_HEADER"]

#: Extra bytes :func:`coalesce` may read to save requests, as a share of the bytes asked for.
SLACK = 0.04
_MAX_REDIRECTS = 5
#: Most byte ranges in one multi-range request, and most characters of its ``Range`` header (common
#: server limits: Apache's ``MaxRanges`` 200, 8 KB request header lines in Apache and nginx).
MAX_RANGES, MAX_RANGE_HEADER = 200, 6000


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", path) is not None


def coalesce(ranges: Sequence[tuple[int, int]], *, slack: float = SLACK) -> list[tuple[int, int]]:
    """Merge byte ranges into few: touching or overlapping ones always, then the smallest gaps first
    while the bytes read in gaps stay within ``slack`` of the bytes asked for.

    Merging the cheapest gaps first gives the fewest requests for that many extra bytes (each merge
    saves one request).

    Args:
        ranges: ``[start, stop)`` byte ranges, any order.
        slack: the extra bytes allowed, as a share of the bytes asked for.

    Returns:
        Sorted, disjoint ``[start, stop)`` ranges covering every input range.
    """
    spans = sorted((a, b) for a, b in ranges if b > a)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    budget = slack * sum(b - a for a, b in merged)
    gaps = sorted(range(len(merged) - 1), key=lambda i: merged[i + 1][0] - merged[i][1])
    join = set()
    for i in gaps:
        gap = merged[i + 1][0] - merged[i][1]
        if gap > budget:
            break
        budget -= gap
        join.add(i)
    out: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(merged):
        if i - 1 in join:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def batches(ranges: Sequence[tuple[int, int]], *, max_ranges: int = MAX_RANGES,
            max_header: int = MAX_RANGE_HEADER) -> list[list[tuple[int, int]]]:
    """``ranges`` in order, cut into groups that each fit one multi-range request: at most
    ``max_ranges`` ranges and ``max_header`` characters of ``bytes=a-b,c-d,...``."""
    out: list[list[tuple[int, int]]] = []
    chars = 0
    for a, b in ranges:
        n = len(f"{a}-{b - 1},")
        if not out or len(out[-1]) >= max_ranges or chars + n > max_header:
            out.append([])
            chars = len("bytes=")
        out[-1].append((a, b))
        chars += n
    return out


class ByteSource:
    """A file read by byte ranges. ``name`` is what messages call it; ``size`` its bytes.

    Subclasses implement :meth:`_fetch`; :meth:`read` checks every answer's length.
    """

    name: str
    size: int

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``[start, stop)`` range, in order, each checked for its length.

        Raises:
            ValueError: a range outside the file, or an answer of another length (a truncated
                download, a server that ignores ``Range``).
        """
        for a, b in ranges:
            if not 0 <= a <= b <= self.size:
                raise ValueError(f"{self.name}: bytes [{a}, {b}) lie outside the file ({self.size} bytes)")
        out = self._fetch(list(ranges))
        for (a, b), data in zip(ranges, out):
            if len(data) != b - a:
                raise ValueError(f"{self.name}: asked for {b - a} bytes at offset {a}, got {len(data)}: the download "
                                 "was cut short or the file changed while it was read; try again")
        return out

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection or file handle."""

    def __enter__(self) -> "ByteSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _LocalSource(ByteSource):
    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        self.name, self.size = str(path), path.stat().st_size
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        out = []
        for a, b in ranges:
            os.lseek(self._fd, a, os.SEEK_SET)
            chunks, left = [], b - a
            while left:
                c = os.read(self._fd, left)
                if not c:
                    break
                chunks.append(c)
                left -= len(c)
            out.append(b"".join(chunks))
        return out

    def close(self) -> None:
        os.close(self._fd)


class _HttpSource(ByteSource):
    """``http(s)://``: one kept-alive connection; the ranges of one read go in multi-range ``GET``
    requests of up to :data:`MAX_RANGES` ranges (one request for a single range), and one by one after
    a server answers a multi-range request with the whole file or with ranges missing (redirects followed)."""

    def __init__(self, url: str) -> None:
        self.name, self._url, self._conn = url, url, None
        self.size, self._multi = -1, True
        first = self._get(0, 8, probe=True)
        self._first = first

    def _connect(self, url: str) -> tuple[http.client.HTTPConnection, str]:
        u = urllib.parse.urlsplit(url)
        key = (u.scheme, u.netloc)
        if self._conn is None or self._conn[0] != key:
            if self._conn is not None:
                self._conn[1].close()
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            self._conn = (key, cls(u.netloc, timeout=60))
        return self._conn[1], (u.path or "/") + (f"?{u.query}" if u.query else "")

    def _send(self, spans: Sequence[tuple[int, int]]) -> tuple[http.client.HTTPResponse, str]:
        """The answer to one ``GET`` of the ``[start, stop)`` byte ranges ``spans``, redirects followed."""
        url, header = self._url, "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in spans)
        for _ in range(_MAX_REDIRECTS + 1):
            conn, target = self._connect(url)
            try:
                conn.request("GET", target, headers={"Range": header, "Accept-Encoding": "identity"})
                r = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self._conn = None
                conn.close()
                raise OSError(f"{self.name}: the request failed ({e}); check the URL and the network") from None
            if r.status in (301, 302, 303, 307, 308) and r.getheader("Location"):
                r.read()
                url = urllib.parse.urljoin(url, r.getheader("Location"))
                continue
            return r, url
        raise OSError(f"{self.name}: more than {_MAX_REDIRECTS} redirects")

    def _get(self, a: int, b: int, probe: bool = False) -> bytes:
        r, url = self._send([(a, b)])
        return self._answer(r, a, b, probe, url)

    def _answer(self, r: http.client.HTTPResponse, a: int, b: int, probe: bool, url: str) -> bytes:
        if r.status == 404:
            self._drop(r)
            raise FileNotFoundError(f"no such file: {self.name} (HTTP 404)")
        if r.status == 416 and probe:
            self._drop(r)
            raise ValueError(f"{self.name} is not a safetensors file: the server says it is shorter than 8 bytes")
        if r.status != 206:
            self._drop(r)
            why = "serves the whole file (HTTP 200) instead of the byte range asked for" if r.status == 200 else \
                f"answered HTTP {r.status} {r.reason}"
            raise ValueError(f"{self.name}: the server {why}; elasticize reads remote files by HTTP range "
                             "requests: use a server with Range support, or download the file and pass its path")
        m = CONTENT_RANGE.fullmatch(r.getheader("Content-Range") or "")
        if m is None or int(m.group(1)) != a or (m.group(3) == "*" and probe):
            self._drop(r)
            raise ValueError(f"{self.name}: the server answered bytes {r.getheader('Content-Range')!r:.60} for "
                             f"bytes {a}-{b - 1}; it does not serve byte ranges correctly")
        if probe:
            self.size = int(m.group(3))
            self._url = url  # after redirects
        try:
            return r.read(b - a) if not probe else r.read(min(b, self.size) - a)
        except (OSError, http.client.HTTPException):
            self._conn = None
            return b""  # the length check names it

    def _drop(self, r: http.client.HTTPResponse) -> None:
        r.close()
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if list(ranges) == [(0, min(8, self.size))] and self._first is not None:
            first, self._first = self._first, None
            ranges = list(ranges)
            if len(first) == ranges[0][1]:
                return [first]
        return super().read(ranges)

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        got: dict[tuple[int, int], bytes] = {}
        for batch in batches(sorted({(a, b) for a, b in ranges if b > a})):
            if len(batch) > 1 and self._multi:
                got.update(self._get_many(batch))
        return [got[(a, b)] if (a, b) in got else self._get(a, b) if b > a else b"" for a, b in ranges]

    def _get_many(self, batch: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The ranges of ``batch`` that one multi-range request brought back (a ``multipart/byteranges``
        answer, or one part that covers several). A server that answers with the whole file (``200``,
        not read) or with parts that miss some ranges turns multi-range requests off; the ranges
        missing are then asked one by one."""
        r, _ = self._send(batch)
        if r.status == 404:
            self._drop(r)
            raise FileNotFoundError(f"no such file: {self.name} (HTTP 404)")
        if r.status != 206:
            self._drop(r)
            self._multi = False
            return {}
        try:
            boundary = boundary_of(r.getheader("Content-Type"))
            if boundary is not None:
                parts = read_byteranges(r, boundary, self.size, self.name)
            else:
                m = CONTENT_RANGE.fullmatch(r.getheader("Content-Range") or "")
                if m is None or m.group(3) != str(self.size) or not int(m.group(1)) <= int(m.group(2)) < self.size:
                    raise ValueError(f"{self.name}: the server answered bytes {r.getheader('Content-Range')!r:.60} "
                                     "to a multi-range request; it does not serve byte ranges correctly")
                parts = [(int(m.group(1)), r.read(int(m.group(2)) + 1 - int(m.group(1))))]
            r.read(1024)  # an epilogue; the connection is kept only when the answer ended
        except (OSError, http.client.HTTPException):
            self._drop(r)
            raise ValueError(f"{self.name}: the download was cut short; try again") from None
        except ValueError:
            self._drop(r)
            raise
        if not r.isclosed():
            self._drop(r)
        parts.sort(key=lambda p: p[0])
        starts = [s for s, _ in parts]
        out = {}
        for a, b in batch:
            i = bisect.bisect_right(starts, a) - 1
            if i >= 0 and starts[i] + len(parts[i][1]) >= b:
                out[(a, b)] = parts[i][1][a - starts[i]:b - starts[i]]
        if len(out) < len(batch):
            self._multi = False
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None


class _FsspecSource(ByteSource):
    """Any other protocol, through fsspec (``fs.cat_ranges``: concurrent where the filesystem is)."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise ImportError(f"reading {url} needs fsspec: pip install 'elasticize[remote]'") from None
        try:
            self._fs, self._path = fsspec.core.url_to_fs(url)
        except ImportError as e:
            raise ImportError(f"reading {url}: {str(e).splitlines()[0]}") from None
        except ValueError as e:
            raise ValueError(f"cannot read {url}: {str(e).splitlines()[0]}") from None
        self.name = url
        try:
            self.size = int(self._fs.size(self._path))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        if not ranges:
            return []
        out = self._fs.cat_ranges([self._path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                                  on_error="return")
        for r in out:
            if isinstance(r, FileNotFoundError):
                raise FileNotFoundError(f"no such file: {self.name}")
            if isinstance(r, Exception):
                raise OSError(f"{self.name}: reading failed ({type(r).__name__}: {str(r)[:200]})")
        return list(out)


def open_source(path: str | os.PathLike) -> ByteSource:
    """A :class:`ByteSource` for a local path, an ``http(s)://`` URL or any fsspec URL.

    Raises:
        FileNotFoundError: no such file (a local path, HTTP 404, or the filesystem's own).
        ImportError: fsspec, or the package that implements the URL's protocol, is not installed
            (the message names it).
        ValueError: an unknown protocol, or an HTTP server that does not serve byte ranges.
        OSError: the connection failed.
    """
    if is_url(path):
        scheme = str(path).split("://", 1)[0].lower()
        if scheme in ("http", "https"):
            return _HttpSource(str(path))
        return _FsspecSource(str(path))
    return _LocalSource(Path(path))
