"""Access control (relayd/auth.py) against the real daemon with `--secret-file`, real curl.

Status rule under test: 401 when the credential does not verify for this exact request
(missing, unknown token, forged or altered signed URL - changed path, n or exp - unknown key
id, expired), 403 when a genuine credential is used for what it does not grant (a receive URL
to send, a send URL to receive, a token outside its prefixes or roles), 429 past
refusals.FAILURE_LIMIT refusals per address.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (CURL, curl_receiver, curl_sender, payload, sha256_file, wait_all,
                      wait_for, waiting_count)
from relayd import auth, cli, refusals
from relayd import sign as sign_cli

KEY1 = secrets.token_hex(32)
KEY2 = secrets.token_hex(32)
TOKEN_LLM = secrets.token_hex(24)        # send + recv under /llm/
TOKEN_RECV = secrets.token_hex(24)       # recv only under /llm/
TOKEN_METRICS = secrets.token_hex(24)
REFUSED = "relayd: refused "


def write_secret_file(tmp_path: Path, keys: dict | None = None, mode: int = 0o600,
                      name: str = "secrets.toml") -> Path:
    keys = {"k1": KEY1, "k2": KEY2} if keys is None else keys
    lines = ["[keys]"] + [f'{kid} = "{hexkey}"' for kid, hexkey in keys.items()]
    lines += ["", "[[tokens]]", 'name = "llm-service"', f'token = "{TOKEN_LLM}"',
              'roles = ["send", "recv"]', 'prefixes = ["/llm/"]',
              "", "[[tokens]]", f'token = "{TOKEN_RECV}"', 'roles = ["recv"]',
              'prefixes = ["/llm/"]',
              "", "[[tokens]]", 'name = "prometheus"', f'token = "{TOKEN_METRICS}"',
              'roles = ["metrics"]', ""]
    path = tmp_path / name
    path.write_text("\n".join(lines))
    os.chmod(path, mode)
    return path


def sign(secret_file: Path, role: str, target: str, *extra: str) -> str:
    """`relayd sign --send|--recv TARGET ...` (cli.main in-process) -> the printed line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["sign", f"--{role}", target, "--secret-file", str(secret_file), *extra])
    assert code == 0
    return out.getvalue().strip()


def signed_by_hand(key_hex: str, role: str, path: str, n: int, exp: int, kid: str) -> str:
    """The documented format, computed independently of relayd: role\\npath\\nn\\nexp\\nkid."""
    mac = hmac.new(bytes.fromhex(key_hex), f"{role}\n{path}\n{n}\n{exp}\n{kid}".encode(),
                   hashlib.sha256).digest()
    sig = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    return f"{path}?n={n}&exp={exp}&kid={kid}&sig={sig}"


def curl_status(url: str, *extra: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, response headers, body) of one request expected to be answered at once."""
    args = [CURL, "-sS", "--max-time", "10", "-D", "-", "-o", "/dev/stderr", "-w",
            "%{http_code}"]
    if method != "GET":
        args += ["-X", method, "--data-binary", "refused body"]
    out = subprocess.run([*args, *extra, url], capture_output=True, text=True, timeout=20)
    headers, _, code = out.stdout.rpartition("\n")          # text mode: \r\n read as \n
    return int(code), headers.lower(), out.stderr


def bearer(token: str) -> tuple[str, str]:
    return "-H", f"Authorization: Bearer {token}"


def transfer(relay, tmp_path: Path, send_target: str, recv_targets: list[str],
             sender_extra=(), receiver_extra=(), receivers_first: bool = True,
             size: int = 1 << 20) -> None:
    """One sender, len(recv_targets) receivers; every receiver's sha256 equals the sender's."""
    src = payload(tmp_path, size, name=f"src-{time.monotonic_ns()}.bin")
    outs = [tmp_path / f"r{i}-{time.monotonic_ns()}.bin" for i in range(len(recv_targets))]

    def start_receivers():
        return [curl_receiver(relay.url + t, out, *receiver_extra)
                for t, out in zip(recv_targets, outs)]
    if receivers_first:
        receivers = start_receivers()
        wait_for(lambda: waiting_count(relay) >= 1, what="receivers waiting")
        sender = curl_sender(relay.url + send_target, src, *sender_extra)
    else:
        sender = curl_sender(relay.url + send_target, src, *sender_extra)
        wait_for(lambda: waiting_count(relay) >= 1, what="sender waiting")
        receivers = start_receivers()
    codes = wait_all([sender, *receivers])
    assert codes == [0] * (1 + len(receivers)), (codes, relay.stderr_text())
    assert b"Sent successfully" in sender.stdout.read()
    assert [sha256_file(o) for o in outs] == [sha256_file(src)] * len(outs)


@pytest.fixture
def secret_file(tmp_path) -> Path:
    return write_secret_file(tmp_path)


@pytest.fixture
def relay(start_relay, secret_file):
    return start_relay("--secret-file", str(secret_file), workers=2)


# -- signed URLs -------------------------------------------------------------------------------
@pytest.mark.parametrize("receivers_first", [True, False], ids=["receivers-first", "sender-first"])
def test_signed_send_url_and_signed_receive_urls_transfer_identical_bytes(
        relay, secret_file, tmp_path, receivers_first):
    send = sign(secret_file, "send", "/llm?n=3", "--ttl", "10m")
    recv = sign(secret_file, "recv", "/llm?n=3", "--ttl", "10m")
    assert send.startswith("/llm?n=3&exp=") and "&kid=k1&sig=" in send
    transfer(relay, tmp_path, send, [recv] * 3, receivers_first=receivers_first)


def test_a_url_signed_by_hand_in_the_documented_format_is_accepted(relay, tmp_path):
    exp = int(time.time()) + 600
    send = signed_by_hand(KEY2, "send", "/by-hand", 2, exp, "k2")
    recv = signed_by_hand(KEY2, "recv", "/by-hand", 2, exp, "k2")
    transfer(relay, tmp_path, send, [recv] * 2)


def test_a_receive_url_cannot_send_and_a_send_url_cannot_receive(relay, secret_file):
    recv = sign(secret_file, "recv", "/llm?n=2")
    send = sign(secret_file, "send", "/llm?n=2")
    status, _, body = curl_status(relay.url + recv, method="PUT")
    assert status == 403 and "cannot send" in body
    status, _, body = curl_status(relay.url + send)
    assert status == 403 and "cannot receive" in body
    assert relay.health()["pipes_waiting"] == 0


def test_changing_n_path_or_expiry_of_a_signed_url_gives_401(relay, secret_file):
    recv = sign(secret_file, "recv", "/llm?n=2")
    exp = recv.split("exp=")[1].split("&")[0]
    for altered in (recv.replace("n=2", "n=3"),
                    recv.replace("/llm?", "/llm2?"),
                    recv.replace(f"exp={exp}", f"exp={int(exp) + 3600}"),
                    recv.replace("n=2&", "")):                     # n defaults to 1
        status, headers, body = curl_status(relay.url + altered)
        assert status == 401, altered
        assert 'www-authenticate: bearer realm="relayd"' in headers
    assert relay.health()["pipes_waiting"] == 0


def test_an_expired_signed_url_gives_401(relay):
    expired = signed_by_hand(KEY1, "recv", "/llm", 1, int(time.time()) - 5, "k1")
    status, headers, body = curl_status(relay.url + expired)
    assert status == 401 and "expired" in body
    assert 'www-authenticate: bearer realm="relayd"' in headers


def test_a_signature_with_a_character_beyond_latin1_gives_401_not_400(relay):
    """%E2%82%AC (a euro sign) in sig: a forgery like any other -- 401, counted and logged as
    a refusal (it was a 400 `malformed request`, from an exception in the check)."""
    url = relay.url + "/llm/euro?n=1&exp=9999999999&kid=k1&sig=%E2%82%AC"
    status, headers, body = curl_status(url)
    assert status == 401 and 'www-authenticate: bearer realm="relayd"' in headers, (status, body)


def test_an_unknown_key_id_gives_401(relay, secret_file):
    recv = sign(secret_file, "recv", "/llm")
    status, headers, _ = curl_status(relay.url + recv.replace("kid=k1", "kid=k9"))
    assert status == 401 and 'www-authenticate: bearer realm="relayd"' in headers
    forged = signed_by_hand(secrets.token_hex(32), "recv", "/llm", 1, int(time.time()) + 60, "k1")
    assert curl_status(relay.url + forged)[0] == 401


def test_a_url_signed_with_the_second_key_works_and_sighup_rotates_the_first_out(
        relay, secret_file, tmp_path):
    send2 = sign(secret_file, "send", "/rot?n=2", "--key-id", "k2")
    recv2 = sign(secret_file, "recv", "/rot?n=2", "--key-id", "k2")
    recv1 = sign(secret_file, "recv", "/rot?n=2")                          # the first key, k1
    assert "kid=k2" in send2 and "kid=k1" in recv1
    transfer(relay, tmp_path, send2, [recv2, recv1])                      # both keys valid

    write_secret_file(tmp_path, keys={"k2": KEY2})                       # k1 retired
    old = {w["pid"] for w in relay.health()["workers"]}
    relay.proc.send_signal(signal.SIGHUP)

    def only_new_workers():
        try:
            pids = {w["pid"] for w in relay.health()["workers"]}
        except OSError:
            return False
        return len(pids) == 2 and not pids & old
    wait_for(only_new_workers, timeout=20, what="the reloaded workers")
    assert curl_status(relay.url + recv1)[0] == 401
    transfer(relay, tmp_path, send2, [recv2, recv2])


# -- bearer tokens -----------------------------------------------------------------------------
def test_a_bearer_token_sends_and_receives_under_its_prefix_only(relay, tmp_path):
    auth_llm = bearer(TOKEN_LLM)
    transfer(relay, tmp_path, "/llm/x?n=2", ["/llm/x?n=2"] * 2,
             sender_extra=auth_llm, receiver_extra=auth_llm, receivers_first=False)
    transfer(relay, tmp_path, "/llm/y", ["/llm/y"],                  # a recv-only token receives
             sender_extra=auth_llm, receiver_extra=bearer(TOKEN_RECV))
    for target, method, token in (("/other", "PUT", TOKEN_LLM), ("/other", "GET", TOKEN_LLM),
                                  ("/llm", "GET", TOKEN_LLM),       # the prefix is /llm/
                                  ("/llm/z", "PUT", TOKEN_RECV),    # no send role
                                  ("/llm/z", "GET", TOKEN_METRICS)):
        status, headers, _ = curl_status(relay.url + target, *bearer(token), method=method)
        assert status == 403, (target, method)
        assert "www-authenticate" not in headers
    assert relay.health()["pipes_waiting"] == 0


def test_a_missing_or_unknown_credential_gives_401_with_www_authenticate(relay):
    for extra, method in (((), "GET"), ((), "PUT"), (bearer("not-a-configured-token"), "GET"),
                          (("-H", f"Authorization: Basic {TOKEN_LLM}"), "PUT"),
                          (("-u", "user:pass"), "GET")):
        status, headers, body = curl_status(relay.url + "/llm/x", *extra, method=method)
        assert status == 401, (extra, method)
        assert 'www-authenticate: bearer realm="relayd"' in headers
        assert body == "[ERROR] a valid signature or token is needed\n"


def test_a_refusal_is_the_same_whether_or_not_the_pipe_has_waiting_parties(relay, tmp_path):
    src = payload(tmp_path, 1000)
    sender = curl_sender(relay.url + "/llm/busy?n=2", src, *bearer(TOKEN_LLM))
    wait_for(lambda: waiting_count(relay) == 1, what="the sender waiting")
    busy = curl_status(relay.url + "/llm/busy?n=2")
    idle = curl_status(relay.url + "/llm/idle?n=2")
    assert busy[0] == idle[0] == 401 and busy[2] == idle[2]
    busy = curl_status(relay.url + "/llm/busy?n=2", *bearer(TOKEN_RECV), method="PUT")
    idle = curl_status(relay.url + "/llm/idle?n=2", *bearer(TOKEN_RECV), method="PUT")
    assert busy[0] == idle[0] == 403 and busy[2] == idle[2]
    sender.kill()
    sender.wait()


# -- refusal counting, reserved paths, logs, start-up ------------------------------------------
def test_25_bad_attempts_from_one_address_get_429_with_retry_after(relay, secret_file):
    url = relay.url + "/llm/guess?n=1&exp=9999999999&kid=k1&sig=AAAA"
    args = [CURL, "-sS", "--max-time", "10", "-w", "%{http_code}\n"]
    for _ in range(25):
        args += ["-o", "/dev/null", url]
    codes = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout.split()
    limit = refusals.FAILURE_LIMIT
    assert codes == ["401"] * limit + ["429"] * (25 - limit)
    # Blocked: even a valid credential is not checked, so guessing cannot go on.
    status, headers, body = curl_status(relay.url + sign(secret_file, "recv", "/llm/ok"))
    assert status == 429
    retry_after = int(headers.split("retry-after:")[1].split()[0])
    assert 1 <= retry_after <= refusals.FAILURE_WINDOW_S
    assert relay.health()["status"] == "ok"                 # reserved paths stay open


def test_reserved_paths_stay_open_without_a_credential(relay):
    for path in ("/", "/help", "/version", "/health"):
        assert curl_status(relay.url + path)[0] == 200, path
    assert REFUSED not in relay.stderr_text()


def test_metrics_needs_a_token_with_the_metrics_role(relay, secret_file):
    assert curl_status(relay.url + "/metrics", *bearer(TOKEN_METRICS))[0] == 200
    for extra in ((), bearer("not-a-configured-token")):
        status, headers, _ = curl_status(relay.url + "/metrics", *extra)
        assert status == 401 and 'www-authenticate: bearer realm="relayd"' in headers
    # A real token without the metrics role: valid but not granted, like the pipes' rule.
    assert curl_status(relay.url + "/metrics", *bearer(TOKEN_LLM))[0] == 403
    authorizer = auth.Authorizer.from_file(str(secret_file))
    assert authorizer.metrics_allowed([(b"authorization", f"Bearer {TOKEN_METRICS}".encode())])
    assert not authorizer.metrics_allowed([(b"authorization", f"Bearer {TOKEN_LLM}".encode())])
    assert not authorizer.metrics_allowed([(b"authorization", b"Bearer wrong-token-123456")])
    assert not authorizer.metrics_allowed([])


def test_every_refusal_is_logged_once_and_no_secret_reaches_the_log(relay, secret_file):
    recv = sign(secret_file, "recv", "/llm/log?n=2")
    send = sign(secret_file, "send", "/llm/log?n=2")
    refusals = [curl_status(relay.url + "/llm/log"),                            # 401 missing
                curl_status(relay.url + recv, method="PUT"),                    # 403 direction
                curl_status(relay.url + send.replace("n=2", "n=5")),            # 401 altered
                curl_status(relay.url + "/other", *bearer(TOKEN_LLM)),          # 403 prefix
                curl_status(relay.url + "/llm/log", *bearer(TOKEN_LLM + "x"))]  # 401 unknown
    assert [r[0] for r in refusals] == [401, 403, 401, 403, 401]
    log = relay.stderr_text()
    lines = [line for line in log.splitlines() if line.startswith(REFUSED)]
    assert len(lines) == len(refusals), log
    assert all("127.0.0.1" in line for line in lines)
    assert "path='/llm/log'" in lines[0] and "path='/other'" in lines[3]
    assert "llm-service" in lines[3]                         # a token is named, not shown
    for secret in (KEY1, KEY2, TOKEN_LLM, TOKEN_RECV, TOKEN_METRICS,
                   recv.split("sig=")[1], send.split("sig=")[1]):
        assert secret not in log


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_the_daemon_refuses_to_start_with_a_secret_file_others_can_read(tmp_path, mode):
    path = write_secret_file(tmp_path, mode=mode)
    out = subprocess.run([sys.executable, "-m", "relayd", "--host", "127.0.0.1", "--port", "0",
                          "--workers", "1", "--secret-file", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "chmod 600" in out.stderr and "listening" not in out.stdout


@pytest.mark.parametrize("content, message", [
    ("[keys]\nk1 = \"abcd\"\n", "at least 16"),
    ("[keys]\nk1 = \"zz\"\n", "not a hex"),
    ("[key]\nk1 = \"%s\"\n" % KEY1, "unknown entries"),
    ("[[tokens]]\ntoken = \"%s\"\nroles = [\"send\"]\n" % TOKEN_LLM, "needs prefixes"),
    ("[[tokens]]\ntoken = \"%s\"\nroles = [\"admin\"]\nprefixes = [\"/\"]\n" % TOKEN_LLM,
     "roles must be"),
    ("", "no [keys] and no [[tokens]]"),
    ("[keys\n", "Expected"),
])
def test_a_malformed_secret_file_is_refused_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        auth.Authorizer.from_file(str(path))


def test_relayd_sign_prints_a_full_url_with_base_and_refuses_bad_input(secret_file):
    url = sign(secret_file, "recv", "/llm?n=50", "--ttl", "2h", "--base", "https://relay:8443/")
    assert url.startswith("https://relay:8443/llm?n=50&exp=") and "kid=k1" in url
    exp = int(url.split("exp=")[1].split("&")[0])
    assert abs(exp - (time.time() + 7200)) < 60
    for ttl, seconds in (("3600s", 3600), ("10m", 600), ("2h", 7200), ("1d", 86400), ("90", 90)):
        assert sign_cli.ttl_seconds(ttl) == seconds
    for bad in (["--send", "/llm", "--ttl", "0"], ["--send", "/llm", "--ttl", "10x"],
                ["--send", "/llm", "--recv", "/llm"], ["--send", "/llm", "--key-id", "k9"],
                ["--send", "/llm?n=300"], ["--send", "/llm?n=2&x=1"], ["--send", "/health"],
                ["--send", "llm"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = sign_cli.main([*bad, "--secret-file", str(secret_file)])
            except SystemExit as e:                     # argparse: usage error
                code = e.code
        assert code in (1, 2) and out.getvalue() == "" and err.getvalue(), bad


def test_relayd_sign_runs_as_a_command(secret_file):
    out = subprocess.run([sys.executable, "-m", "relayd", "sign", "--recv", "/llm?n=2",
                          "--ttl", "1h", "--secret-file", str(secret_file)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("/llm?n=2&exp="), out.stderr
    os.chmod(secret_file, 0o644)
    out = subprocess.run([sys.executable, "-m", "relayd", "sign", "--recv", "/llm",
                          "--secret-file", str(secret_file)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "chmod 600" in out.stderr and out.stdout == ""
