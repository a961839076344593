"""Incremental HTTP/1.1 response decoder for the lean receivers.

Feed it whatever recv() returned; it parses the response head once, then hands every body
piece to `on_body` as a memoryview of the caller's buffer (no copy: the receivers hash it
in place). It understands Content-Length, chunked (with trailers) and read-until-close.
`complete` becomes True only on a well-formed end, so a truncated stream never looks whole.
"""

MAX_HEAD_BYTES = 64 * 1024
MAX_SIZE_LINE_BYTES = 1024


class ProtocolError(Exception):
    """The server sent something that is not a valid HTTP/1.1 response."""


class ResponseDecoder:
    HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, UNTIL_CLOSE, DONE = range(8)

    def __init__(self, on_body):
        self.on_body = on_body
        self.state = self.HEAD
        self.status = None
        self.headers = {}
        self.complete = False
        self._pending = bytearray()  # head, size line or trailer bytes not yet parsed
        self._remaining = 0          # body bytes left in the current length or chunk

    def feed(self, data):
        """Consume `data` (bytes or memoryview); raises ProtocolError on a bad response."""
        view = memoryview(data)
        while len(view) and self.state != self.DONE:
            view = self._step(view)

    def feed_eof(self):
        """The peer closed: a read-until-close body ends well, anything else is truncated."""
        if self.state == self.UNTIL_CLOSE:
            self.state, self.complete = self.DONE, True

    def _step(self, view):
        state = self.state
        if state == self.LENGTH or state == self.CHUNK_DATA:
            take = min(self._remaining, len(view))
            self.on_body(view[:take])
            self._remaining -= take
            if self._remaining == 0:
                if state == self.LENGTH:
                    self._finish()
                else:
                    self.state = self.CHUNK_CRLF
            return view[take:]
        if state == self.UNTIL_CLOSE:
            self.on_body(view)
            return view[len(view):]
        if state == self.HEAD:
            return self._step_head(view)
        # Size lines and trailers are short: look for their LF in a small window only.
        newline = bytes(view[:MAX_SIZE_LINE_BYTES]).find(b"\n")
        if newline < 0:
            self._pending += view
            if len(self._pending) > MAX_SIZE_LINE_BYTES:
                raise ProtocolError("chunk size line or trailer too long")
            return view[len(view):]
        line = bytes(self._pending) + bytes(view[:newline])
        self._pending.clear()
        rest = view[newline + 1:]
        line = line.rstrip(b"\r")
        if state == self.CHUNK_SIZE:
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                self.state = self.TRAILERS
            else:
                self._remaining, self.state = size, self.CHUNK_DATA
        elif state == self.CHUNK_CRLF:
            if line:
                raise ProtocolError("chunk data not followed by CRLF")
            self.state = self.CHUNK_SIZE
        elif state == self.TRAILERS:
            if not line:
                self._finish()
        return rest

    def _step_head(self, view):
        self._pending += view
        end = self._pending.find(b"\r\n\r\n")
        if end < 0:
            if len(self._pending) > MAX_HEAD_BYTES:
                raise ProtocolError("response head too long")
            return view[len(view):]
        head = bytes(self._pending[:end]).decode("latin-1")
        # Whatever followed the head is body: hand it back as a fresh view.
        rest = memoryview(bytes(self._pending[end + 4:]))
        self._pending.clear()
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {status_line[:60]!r}")
        self.status = int(parts[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status == 100:  # interim response: a real one follows
            self.status, self.headers = None, {}
            return rest
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            self.state = self.CHUNK_SIZE
        elif "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
            self.state = self.LENGTH
            if self._remaining == 0:
                self._finish()
        else:
            self.state = self.UNTIL_CLOSE
        return rest

    def _finish(self):
        self.state, self.complete = self.DONE, True
