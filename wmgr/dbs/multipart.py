"""A multipart/form-data body read from a seekable file, part by part, without holding it in memory.

twisted.web spools a large request body to a temporary file before the resource sees it; a table
upload can be gigabytes. So the body is never parsed into memory: one pass finds the boundaries
(bytes.find over fixed-size blocks), the few part headers are read by seeking, and a part's content
is handed out as an iterator of blocks over its byte range. Two passes rather than one push
parser because the parts may come in any order (load-options after table-data is legal) and the
data must be fed to the database only once the options are known; the second pass over a file the
first has just read comes from the page cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

from wmgr.dbs.errors import InvalidArgument

BLOCK = 1 << 20
MAX_HEADERS = 16 * 1024
MAX_PARTS = 32

_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))', re.I)
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


@dataclass
class Part:
    name: str
    filename: Optional[str]
    content_type: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def boundary_of(content_type: Optional[bytes]) -> bytes:
    if not content_type or not content_type.split(b";")[0].strip().lower() == b"multipart/form-data":
        raise InvalidArgument("the body must be multipart/form-data")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise InvalidArgument("the multipart/form-data Content-Type has no boundary")
    return m.group(1) or m.group(2)


def _delimiter_offsets(body: BinaryIO, delimiter: bytes) -> list[int]:
    """Offsets of every CRLF--boundary (or --boundary at offset 0), scanning block by block
    with an overlap so a delimiter split between two blocks is still found."""
    pattern, offsets = b"\r\n" + delimiter, []
    body.seek(0)
    if body.read(len(delimiter)) == delimiter:
        offsets.append(-2)  # as if preceded by CRLF
    body.seek(0)
    base, carry = 0, b""
    while True:
        block = body.read(BLOCK)
        if not block:
            return offsets
        data = carry + block
        start = base - len(carry)
        i = data.find(pattern)
        while i != -1:
            offsets.append(start + i)
            if len(offsets) > MAX_PARTS + 1:
                raise InvalidArgument(f"the body has more than {MAX_PARTS} parts")
            i = data.find(pattern, i + len(pattern))
        carry = data[-(len(pattern) - 1):]
        base += len(block)


def _parse_headers(raw: bytes) -> tuple[str, Optional[str], str]:
    name, filename, content_type = None, None, "text/plain"
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-disposition":
            params = {k.lower(): (q if q is not None else p) for k, q, p in _PARAM.findall(value)}
            for k, v in list(params.items()):
                params[k] = re.sub(r"\\(.)", r"\1", v) if v else v
            name = params.get("name")
            filename = params.get("filename")
        elif key == "content-type":
            content_type = value.strip()
    if name is None:
        raise InvalidArgument("a multipart part has no Content-Disposition name")
    return name, filename, content_type


def _is_delimiter_line(body: BinaryIO, after: int) -> bool:
    """A boundary is a delimiter only when the line ends after it (RFC 2046: optional blanks,
    then CRLF) or the closing "--" follows; data may hold the same bytes followed by more."""
    body.seek(after)
    rest = body.read(80)
    return rest.startswith(b"--") or rest.lstrip(b" \t").startswith(b"\r\n")


def scan(body: BinaryIO, content_type: Optional[bytes]) -> dict[str, Part]:
    """The parts of the body by name (the first part of each name), with their byte ranges."""
    delimiter = b"--" + boundary_of(content_type)
    offsets = _delimiter_offsets(body, delimiter)
    if not offsets:
        raise InvalidArgument("the multipart body has no boundary line")
    offsets = [o for o in offsets if _is_delimiter_line(body, o + 2 + len(delimiter))]
    parts: dict[str, Part] = {}
    for here, following in zip(offsets, offsets[1:] + [None]):
        after = here + 2 + len(delimiter)
        body.seek(after)
        head = body.read(MAX_HEADERS + 4)
        if head.startswith(b"--"):
            return parts
        if following is None:
            break
        end_of_headers = head.find(b"\r\n\r\n")
        if end_of_headers == -1:
            raise InvalidArgument("a multipart part's headers are too long or unterminated")
        line_end = head.find(b"\r\n")
        name, filename, ctype = _parse_headers(head[line_end + 2:end_of_headers])
        start = after + end_of_headers + 4
        if start > following:
            raise InvalidArgument("a multipart part is cut short")
        parts.setdefault(name, Part(name, filename, ctype, start, following))
    raise InvalidArgument("the multipart body has no closing boundary")


def read_blocks(body: BinaryIO, part: Part, block: int = BLOCK) -> Iterator[bytes]:
    position = part.start
    while position < part.end:
        body.seek(position)
        data = body.read(min(block, part.end - position))
        if not data:
            raise InvalidArgument("the body ended inside a part")
        position += len(data)
        yield data


def read_small(body: BinaryIO, part: Part, limit: int) -> bytes:
    if part.size > limit:
        raise InvalidArgument(f"part {part.name} is larger than {limit} bytes")
    body.seek(part.start)
    return body.read(part.size)
