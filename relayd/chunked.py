"""Validate a chunked request body in place, so its framing can go to receivers as received.

A well-formed chunked body is already what an HTTP/1.1 receiver must get, so the producer
receives it straight into the ring (as a Content-Length body) and this scanner only walks the
size lines: chunk data is skipped by arithmetic, never looked at or copied. What the scanner
has not finished judging (a size line still arriving, the trailer section) is held back from
receivers; the last-chunk line and any trailer fields are replaced by a plain `0\\r\\n\\r\\n`.

The rules are llhttp's strict ones, which the head parser applies too: CRLF line ends, hex
sizes without whitespace, extensions `;name[=token|"quoted"]` (passed through as they are).
"""
from __future__ import annotations

import re

SIZE, DATA, DATA_END, TRAILER, DONE = range(5)
MAX_SIZE_DIGITS = 16     # significant ones: a size below 2**64
MAX_LINE = 4096          # a size line with its extensions, CRLF included
MAX_TRAILER = 8192       # the whole trailer section
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
SIZE_LINE = re.compile(rb"([0-9a-fA-F]+)((?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED
                       + rb")?)?)*)\r\n")
TRAILER_LINE = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\r\n")


class MalformedChunk(ValueError):
    pass


class ChunkScanner:
    """Walks a chunked body as it arrives; `position` counts body bytes fed so far."""

    __slots__ = ("state", "left", "line", "line_at", "crlf", "position", "data_bytes")

    def __init__(self) -> None:
        self.state = SIZE
        self.left = 0            # DATA: chunk bytes still to come
        self.line = b""          # SIZE / TRAILER: the part of the line seen so far
        self.line_at = 0         # where the current size line (or the last chunk) starts
        self.crlf = 0            # DATA_END: bytes of the CRLF seen
        self.position = 0
        self.data_bytes = 0      # payload bytes, framing excluded

    @property
    def visible(self) -> int:
        """Bytes receivers may have: all, except a size line or trailer still being judged."""
        return self.line_at if self.state in (SIZE, TRAILER, DONE) else self.position

    @property
    def done(self) -> bool:
        return self.state == DONE

    def feed(self, buf, find) -> None:
        """Scan `buf` (the bytes just received, a memoryview). `find(start, end)` returns the
        index of the first LF in buf[start:end] or -1 (the caller searches its own buffer
        without copying it). Raises MalformedChunk."""
        i, n = 0, len(buf)
        while i < n and self.state != DONE:
            state = self.state
            if state == DATA:
                step = min(self.left, n - i)
                self.left -= step
                self.data_bytes += step
                i += step
                if not self.left:
                    self.state, self.crlf = DATA_END, 0
            elif state == DATA_END:
                if buf[i] != (13, 10)[self.crlf]:
                    raise MalformedChunk("chunk data is not followed by CRLF")
                i += 1
                self.crlf += 1
                if self.crlf == 2:
                    self.state, self.line_at = SIZE, self.position + i
            else:
                lf = find(i, n)
                end = n if lf < 0 else lf + 1
                self.line += bytes(buf[i:end])
                i = end
                if state == SIZE:
                    if len(self.line) > MAX_LINE:
                        raise MalformedChunk("a chunk size line is too long")
                    if lf >= 0:
                        self._size_line()
                else:
                    if len(self.line) > MAX_TRAILER:
                        raise MalformedChunk("the trailer section is too long")
                    if lf >= 0:
                        self._trailer_line()
        self.position += i

    def _size_line(self) -> None:
        line, self.line = self.line, b""
        m = SIZE_LINE.fullmatch(line)
        if m is None:
            raise MalformedChunk("a chunk size line is not hex digits, extensions and CRLF")
        digits = m.group(1).lstrip(b"0")
        if len(digits) > MAX_SIZE_DIGITS:
            raise MalformedChunk("a chunk size is too large")
        size = int(digits or b"0", 16)
        if size:
            self.state, self.left = DATA, size
        else:
            self.state = TRAILER          # line_at stays on the last chunk: it is rewritten

    def _trailer_line(self) -> None:
        """Trailer fields are checked, then dropped (the receivers' heads are long gone)."""
        start = self.line.rfind(b"\n", 0, len(self.line) - 1) + 1
        line = self.line[start:]
        if line == b"\r\n":
            self.state = DONE
        elif TRAILER_LINE.fullmatch(line) is None:
            raise MalformedChunk("a trailer line is not a header field")
