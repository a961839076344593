"""Fan-out trees: one stream to 600 receivers through `relayd forward` branches.

Node A (the root) serves 3 receivers: three `relayd forward` processes, each the sender of the
same path on node B, C or D, which serve 200 receivers each. Receivers are one selectors loop in
this process (600 curl processes would take the cores the relays need); every receiver's body is
decoded with httptools and hashed, and must equal the sender's bytes — or, when the root's sender
is cut short, end short (no last chunk) with a prefix of the sender's bytes.
"""
from __future__ import annotations

import hashlib
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time

import httptools
from conftest import curl_sender, payload, sha256_file, wait_all, wait_for

LEAVES_PER_NODE = 200
BRANCHES = 3
PAYLOAD_BYTES = 1 << 20
WINDOW = "512k"               # the 1 MiB payload wraps every ring twice
DEADLINE_S = 60


def raise_nofile(want: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


class Receiver:
    """One GET on a raw non-blocking socket: status, headers, sha256 of the decoded body."""

    def __init__(self, port: int, target: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.complete = False
        self.closed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self.sha.update(data)
        self.bytes += len(data)

    def on_message_complete(self) -> None:
        self.complete = True

    def readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except ConnectionError:
            data = b""
        if data:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                data = b""
        if not data or self.complete:
            self.closed = True
            self.sock.close()


class Receivers:
    """Many receivers driven by one selectors loop in a background thread."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.all: list[Receiver] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = False

    def add(self, port: int, target: str, count: int) -> list[Receiver]:
        group = [Receiver(port, target) for _ in range(count)]
        for r in group:
            self.selector.register(r.sock, selectors.EVENT_READ, r)
        self.all += group
        return group

    def start(self) -> Receivers:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop and not all(r.closed for r in self.all):
            for key, _ in self.selector.select(0.2):
                r = key.data
                r.readable()
                if r.closed:
                    self.selector.unregister(key.fileobj)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        self.stop = True
        self.thread.join(5)
        for r in self.all:
            if not r.closed:
                r.sock.close()


def forwarder(source: str, *dests: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relayd", "forward", source, *dests],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_one_stream_reaches_600_receivers_through_a_two_level_tree(start_relay, tmp_path):
    raise_nofile()
    root = start_relay("--window", WINDOW)
    leaves = [start_relay("--window", WINDOW) for _ in range(BRANCHES)]
    src = payload(tmp_path, PAYLOAD_BYTES, seed=7)
    want = sha256_file(src)
    path = "/tree-600"

    receivers = Receivers()
    groups = [receivers.add(node.port, f"{path}?n={LEAVES_PER_NODE}", LEAVES_PER_NODE)
              for node in leaves]
    receivers.start()
    branches = [forwarder(f"{root.url}{path}?n={BRANCHES}", f"{node.url}{path}?n={LEAVES_PER_NODE}")
                for node in leaves]
    t0 = time.monotonic()
    sender = curl_sender(f"{root.url}{path}?n={BRANCHES}", src, "-H", "Content-Type: text/csv",
                         "-H", "X-Piping-Tree: yes")
    sender_out, sender_err = sender.communicate(timeout=DEADLINE_S)
    branch_codes = wait_all(branches, timeout=DEADLINE_S)
    receivers.join(DEADLINE_S)
    elapsed = time.monotonic() - t0

    for p in branches:
        err = p.stderr.read().decode(errors="replace")
        assert "Sent successfully to 200 receiver(s)" in err, err
    assert branch_codes == [0] * BRANCHES
    assert sender.returncode == 0, sender_err
    assert b"Sent successfully to 3 receiver(s)" in sender_out
    for node, group in zip(leaves, groups):
        assert [r.status for r in group] == [200] * LEAVES_PER_NODE
        assert all(r.complete for r in group)
        assert {r.sha.hexdigest() for r in group} == {want}
        # The root's headers travel down the tree.
        assert {r.headers.get(b"content-type") for r in group} == {b"text/csv"}
        assert {r.headers.get(b"x-piping-tree") for r in group} == {b"yes"}
        assert sum(w["receivers"] for w in node.health()["workers"]) == LEAVES_PER_NODE
    print(f"\ntree: {BRANCHES * LEAVES_PER_NODE} receivers x {PAYLOAD_BYTES} B intact "
          f"in {elapsed:.2f} s (sender start -> last receiver done)")
    for node in (root, *leaves):
        node.wait_idle()


def test_source_cut_short_ends_every_leaf_body_short(start_relay, tmp_path):
    """The root's sender dies mid-body: the forwarder (one, with --dest to a second node)
    exits 1 and every leaf body ends short."""
    raise_nofile()
    root = start_relay("--window", WINDOW)
    leaves = [start_relay("--window", WINDOW) for _ in range(2)]
    data = payload(tmp_path, PAYLOAD_BYTES, seed=8).read_bytes()
    sent_bytes = 300_000
    path, leaf_n = "/tree-short", 5

    receivers = Receivers()
    groups = [receivers.add(node.port, f"{path}?n={leaf_n}", leaf_n) for node in leaves]
    receivers.start()
    branch = forwarder(f"{root.url}{path}?n=1", f"{leaves[0].url}{path}?n={leaf_n}",
                       "--dest", f"{leaves[1].url}{path}?n={leaf_n}")
    # A sender that promises the whole payload and vanishes after 300 kB.
    s = socket.create_connection(("127.0.0.1", root.port), timeout=30)
    s.sendall(f"PUT {path}?n=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode())
    progress = b""
    while b"Start sending" not in progress:
        chunk = s.recv(4096)
        assert chunk, progress
        progress += chunk
    s.sendall(data[:sent_bytes])
    # Let the bytes reach the leaves first, so "short" means short, not empty.
    wait_for(lambda: all(r.bytes == sent_bytes for g in groups for r in g), timeout=20,
             what="the first 300 kB at every leaf")
    s.close()

    assert wait_all([branch], timeout=DEADLINE_S) == [1]
    receivers.join(DEADLINE_S)
    assert b"body ended short" in branch.stderr.read()
    prefix = hashlib.sha256(data[:sent_bytes]).hexdigest()
    for group in groups:
        assert [r.status for r in group] == [200] * leaf_n
        assert not any(r.complete for r in group)          # no last chunk: curl would exit 18
        assert {(r.bytes, r.sha.hexdigest()) for r in group} == {(sent_bytes, prefix)}
    for node in (root, *leaves):
        node.wait_idle()
