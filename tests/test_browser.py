"""The browser page `GET /` in a real headless Chromium, driven by playwright, against the real
daemon: one page receives a path, another sends to it, and what the receiving page shows (its
sha256, its progress, the file it saves) must be the sender's bytes.

Needs Debian's `chromium` (apt-get install -y chromium) and `pip install playwright`; never
`playwright install`: the test launches /usr/bin/chromium itself. Chromium gets flags that keep
it off the network, and every request a page makes is checked to go to the relay only. Only the
tests that drive a page skip without them; the page's own HTTP answers are checked with a raw
socket.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from conftest import curl_receiver, curl_sender, payload, sha256_file, wait_all

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TRANSFER_TIMEOUT_MS = 30_000
SIZE = (1 << 20) + 12_345          # ~1 MiB, not a multiple of any chunk size


@pytest.fixture(scope="module")
def browser():
    """Chromium driven by playwright; only the tests that use a page skip without them."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is missing: pip install playwright "
                                          "(never `playwright install`; /usr/bin/chromium "
                                          "is used)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def pages(browser, start_relay):
    """open(relay) -> a fresh page at the relay's `/`; asserts no request left the relay."""
    contexts, seen = [], []

    def open_page(relay, fragment: str = ""):
        ctx = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("request", lambda r: seen.append((relay.url, r.url)))
        page.goto(relay.url + "/" + fragment)
        return page

    yield open_page
    for ctx in contexts:
        ctx.close()
    for origin, url in seen:
        assert url.startswith((origin + "/", "blob:" + origin + "/", "data:")), url


def fill_pipe(page, side: str, path: str, n: int) -> None:
    page.fill(f"#{side}-path", path)
    page.fill(f"#{side}-n", str(n))


def wait_state(page, section: str, state: str) -> None:
    page.wait_for_function(
        f"() => ['done', 'failed', 'cancelled'].includes(document.getElementById('{section}')"
        ".dataset.state)", timeout=TRANSFER_TIMEOUT_MS)
    got = page.eval_on_selector(f"#{section}", "e => e.dataset.state")
    status = page.inner_text("#send-status" if section == "send" else "#recv-status")
    assert got == state, f"{section} ended {got}: {status}"


def progress(page, side: str) -> tuple[float, float]:
    value, maximum = page.eval_on_selector(f"#{side}-progress", "p => [p.value, p.max]")
    return value, maximum


def send_file(page, path: str, n: int, source: Path) -> None:
    fill_pipe(page, "send", path, n)
    page.check("#send-kind-file")
    page.set_input_files("#send-file", str(source))
    page.click("#send-start")


def receive(page, path: str, n: int) -> None:
    fill_pipe(page, "recv", path, n)
    page.click("#recv-start")
    page.wait_for_function("() => document.getElementById('receive').dataset.state")


def assert_received(page, download, source: Path, tmp_path: Path) -> None:
    wait_state(page, "receive", "done")
    expected = sha256_file(source)
    assert page.inner_text("#recv-sha256").strip() == expected
    value, maximum = progress(page, "recv")
    assert value == maximum == source.stat().st_size
    assert re.search(r"\(100%\)", page.inner_text("#recv-stats"))
    saved = tmp_path / f"saved-{id(page)}"
    download.save_as(saved)
    assert sha256_file(saved) == expected
    assert download.suggested_filename == source.name


def test_receiver_page_first_then_sender_page_file_arrives_identical(pages, start_relay,
                                                                      tmp_path):
    relay = start_relay(workers=2)
    source = payload(tmp_path, SIZE, "random.bin", seed=7)
    receiver, sender = pages(relay), pages(relay)
    with receiver.expect_download(timeout=TRANSFER_TIMEOUT_MS) as got:
        receive(receiver, "/browser", 1)
        send_file(sender, "/browser", 1, source)
        wait_state(sender, "send", "done")
    assert_received(receiver, got.value, source, tmp_path)
    assert progress(sender, "send") == (SIZE, SIZE)
    assert sender.inner_text("#send-sha256").strip() == sha256_file(source)
    assert "Sent successfully to 1 receiver" in sender.inner_text("#send-log")
    relay.wait_idle()


def test_sender_page_first_then_two_receiver_pages_get_identical_bytes(pages, start_relay,
                                                                       tmp_path):
    relay = start_relay(workers=2)
    source = payload(tmp_path, SIZE, "two.bin", seed=8)
    sender, first, second = pages(relay), pages(relay), pages(relay)
    send_file(sender, "/fan", 2, source)
    sender.wait_for_function("() => /Waiting for 2 receiver/.test("
                             "document.getElementById('send-log').textContent)",
                             timeout=TRANSFER_TIMEOUT_MS)
    with first.expect_download(timeout=TRANSFER_TIMEOUT_MS) as a, \
            second.expect_download(timeout=TRANSFER_TIMEOUT_MS) as b:
        receive(first, "/fan", 2)
        receive(second, "/fan", 2)
    assert_received(first, a.value, source, tmp_path)
    assert_received(second, b.value, source, tmp_path)
    wait_state(sender, "send", "done")
    assert progress(sender, "send") == (SIZE, SIZE)
    relay.wait_idle()


def test_text_sent_from_page_reaches_curl_and_page_shows_it(pages, start_relay, tmp_path):
    relay = start_relay(workers=2)
    text = "héllo from the browser\nline 2 'quoted'\n"
    sender = pages(relay)
    fill_pipe(sender, "send", "/text", 1)
    sender.fill("#send-text", text)
    out = tmp_path / "got.txt"
    receiver = curl_receiver(relay.url + "/text?n=1", out, "-D", str(tmp_path / "head"))
    sender.click("#send-start")
    wait_state(sender, "send", "done")
    assert wait_all([receiver]) == [0]
    assert out.read_bytes() == text.encode()
    assert "content-type: text/plain; charset=utf-8" in (tmp_path / "head").read_text().lower()
    assert sender.inner_text("#send-sha256").strip() == hashlib.sha256(text.encode()).hexdigest()
    # The curl command the page shows sends the same bytes: run it through a shell.
    command = sender.inner_text("#send-curl")
    assert relay.url + "/text?n=1" in command
    again = curl_receiver(relay.url + "/text?n=1", tmp_path / "again.txt")
    shell = __import__("subprocess").run(["sh", "-c", command.replace("curl ", "curl -sS ", 1)],
                                         capture_output=True, timeout=30)
    assert shell.returncode == 0, shell.stderr
    assert wait_all([again]) == [0]
    assert (tmp_path / "again.txt").read_bytes() == text.encode()


def test_curl_sender_to_receiver_page_shows_text_and_sha256(pages, start_relay, tmp_path):
    relay = start_relay(workers=1)
    body = tmp_path / "note.txt"
    body.write_bytes(b"plain text for a person\n")
    receiver = pages(relay, "#receive=/note&n=1")
    assert receiver.input_value("#recv-path") == "/note"
    assert receiver.inner_text("#recv-curl").startswith(f"curl -o 'note' '{relay.url}/note?n=1'")
    with receiver.expect_download(timeout=TRANSFER_TIMEOUT_MS) as got:
        receiver.click("#recv-start")
        sender = curl_sender(relay.url + "/note?n=1", body, "-H", "Content-Type: text/plain",
                             "-H", 'Content-Disposition: attachment; filename="note.txt"')
        assert wait_all([sender]) == [0]
    assert_received(receiver, got.value, body, tmp_path)
    assert receiver.text_content("#recv-text") == body.read_text()


def test_receiver_page_sees_a_short_body_as_a_failure(pages, start_relay, tmp_path):
    relay = start_relay(workers=2)
    receiver = pages(relay)
    receive(receiver, "/short", 1)
    import socket
    s = socket.create_connection(("127.0.0.1", relay.port))
    s.sendall(b"PUT /short?n=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    receiver.wait_for_function("() => document.getElementById('receive').dataset.state === "
                               "'receiving'", timeout=TRANSFER_TIMEOUT_MS)
    s.sendall(b"x" * 1000)
    s.close()                                  # 99,000 bytes short
    wait_state(receiver, "receive", "failed")
    assert receiver.inner_text("#recv-sha256") == ""
    assert "did not complete" in receiver.inner_text("#recv-status")


def test_reserved_path_and_bad_n_are_refused_before_any_request(pages, start_relay):
    relay = start_relay(workers=1)
    page = pages(relay)
    fill_pipe(page, "send", "/health", 1)
    page.click("#send-start")
    assert "reserved" in page.inner_text("#send-status")
    assert "reserved" in page.inner_text("#send-curl")
    fill_pipe(page, "recv", "/ok", 300)
    page.click("#recv-start")
    assert "n must be" in page.inner_text("#recv-status")


def test_fallback_sha256_matches_hashlib(pages, start_relay):
    """crypto.subtle is missing on plain http to a non-localhost relay: the JS fallback."""
    page = pages(start_relay(workers=1))
    rnd = __import__("random").Random(3)
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 1000, 100_003):
        data = rnd.randbytes(n)
        got = page.evaluate("a => relaydSha256(new Uint8Array(a))", list(data))
        assert got == hashlib.sha256(data).hexdigest(), n


def test_page_and_help_use_the_requests_host(start_relay):
    relay = start_relay(workers=1)
    from conftest import http
    status, headers, body = http(relay.port, "GET", "/help", {})
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"curl -T - http://127.0.0.1/mypath?n=3" in body
    status, headers, body = http(relay.port, "GET", "/", {})
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"Content-Security-Policy" in body and b"connect-src 'self'" in body
    assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//""", body)


@pytest.mark.skipif(not os.environ.get("RELAYD_SCREENSHOT"),
                    reason="set RELAYD_SCREENSHOT=docs/screenshot.png to regenerate it")
def test_screenshot(pages, start_relay, tmp_path):
    """RELAYD_SCREENSHOT=docs/screenshot.png regenerates the picture in docs/operations.md:
    one page sends a file to itself (its Send and Receive halves are two HTTP clients)."""
    target = os.environ["RELAYD_SCREENSHOT"]
    relay = start_relay(workers=2)
    source = payload(tmp_path, 3 << 20, "report.pdf", seed=1)
    page = pages(relay)
    with page.expect_download(timeout=TRANSFER_TIMEOUT_MS) as got:
        send_file(page, "/report", 1, source)
        receive(page, "/report", 1)
        wait_state(page, "send", "done")
    assert_received(page, got.value, source, tmp_path)
    page.screenshot(path=target, full_page=True)
