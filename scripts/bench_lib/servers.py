"""The servers under test, each on 127.0.0.1 and a free port, each in its own process group.

Every server is started with start_new_session=True, so its PID is also its process group
id: stop() signals exactly that group (SIGTERM, then SIGKILL after a grace period) and never
touches another process. The harness raises its own RLIMIT_NOFILE soft limit before any
server starts, and children inherit it (the waiting workload holds 10,000 sockets).
"""
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from bench_lib import procstats
from bench_lib.lifetime import die_with_parent

START_TIMEOUT_S = 20
STOP_GRACE_S = 10
RELAYD_URL = re.compile(r"http://[0-9.]+:[0-9]+")
SETTLE_QUIET_S = 0.3       # before each run: every server idle this long ...
SETTLE_MAX_S = 5.0         # ... or this much waiting at most


class ServerError(RuntimeError):
    """A server did not start, or died while it was measured."""


def free_port():
    """A port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port, process, log_path, timeout_s=START_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"exited with {process.returncode} before listening; "
                              f"log: {tail(log_path)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ServerError(f"not listening on 127.0.0.1:{port} after {timeout_s} s")


def tail(path, limit=800):
    try:
        with open(path, "rb") as log:
            return log.read()[-limit:].decode("utf-8", "replace")
    except OSError:
        return ""


def settle(live):
    """Wait (at most SETTLE_MAX_S) until no server in `live` has used more than 2% of a core
    over SETTLE_QUIET_S: a server still closing the previous run's sockets or collecting
    garbage would otherwise take cores from whichever server runs next."""
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        before = [s.cpu_seconds() for s in live]
        time.sleep(SETTLE_QUIET_S)
        used = [s.cpu_seconds() - b for s, b in zip(live, before)]
        if all(u <= 0.02 * SETTLE_QUIET_S for u in used):
            return


class Server:
    """Base: a process group we started, its URL, and measurements of its process tree."""

    name = "server"
    has_producer = True  # False: serves a static file, no sender (nginx)

    def __init__(self, workdir):
        self.workdir = workdir
        self.process = None
        self.host = "127.0.0.1"
        self.port = None
        safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)    # a label may hold "/"
        self.log_path = os.path.join(workdir, f"{safe_name}-{id(self)}.log")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def cpu_seconds(self):
        return procstats.cpu_seconds(self.process.pid)

    def rss_bytes(self):
        return procstats.rss_bytes(self.process.pid)

    def check_alive(self):
        if self.process.poll() is not None:
            raise ServerError(f"{self.name} exited with {self.process.returncode}; "
                              f"log: {tail(self.log_path)}")

    def spawn(self, argv, **kwargs):
        log = open(self.log_path, "ab")
        kwargs.setdefault("stdout", log)
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log,
                                        start_new_session=True, preexec_fn=die_with_parent,
                                        **kwargs)
        log.close()

    def stop(self):
        """SIGTERM the group we created, SIGKILL it after the grace period. Safe twice."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # workers left behind by a slow supervisor
        except ProcessLookupError:
            pass
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self.process = None

    def describe(self):
        return self.name


class RelaydServer(Server):
    """python -m relayd: the supervisor prints its URL as the first stdout line."""

    def __init__(self, workdir, repo_root, workers, transmit="auto", window=None, label=None,
                 options=()):
        self.repo_root = repo_root
        self.workers = workers
        self.transmit = transmit
        self.window = window
        self.options = list(options)        # more relayd flags, last (so they win)
        self.name = label or "relayd"
        super().__init__(workdir)

    def argv(self):
        argv = [sys.executable, "-m", "relayd", "--host", "127.0.0.1", "--port", "0",
                "--workers", str(self.workers), "--transmit", self.transmit]
        if self.window:
            argv += ["--window", str(self.window)]
        return argv + self.options

    def start(self):
        env = dict(os.environ, PYTHONPATH=self.repo_root, PYTHONUNBUFFERED="1")
        self.spawn(self.argv(), stdout=subprocess.PIPE, cwd=self.repo_root, env=env)
        first_line = self._read_first_line()
        match = RELAYD_URL.search(first_line)
        if not match:
            self.stop()
            raise ServerError(f"relayd's first line has no URL: {first_line!r}; "
                              f"log: {tail(self.log_path)}")
        self.port = int(match.group(0).rsplit(":", 1)[1])
        # Keep draining stdout so relayd never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()
        wait_listening(self.port, self.process, self.log_path)

    def _read_first_line(self):
        stream = self.process.stdout
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([stream], [], [], 0.2)
            if ready:
                byte = os.read(stream.fileno(), 1)
                if not byte:
                    break
                line += byte
            elif self.process.poll() is not None:
                break
        return line.decode("utf-8", "replace")

    @staticmethod
    def _drain(stream):
        try:
            while os.read(stream.fileno(), 65536):
                pass
        except (OSError, ValueError):
            pass

    def describe(self):
        return "python " + " ".join(self.argv()[1:])


class PipingServer(Server):
    """piping-server (npm), run by node directly so the PID is node itself."""

    name = "piping-server"

    def __init__(self, workdir, cache_dir):
        super().__init__(workdir)
        self.entry = os.path.join(cache_dir, "node_modules", "piping-server", "dist", "src",
                                  "index.js")
        if not os.path.exists(self.entry):
            self.entry = os.path.join(cache_dir, "node_modules", ".bin", "piping-server")

    def start(self):
        self.port = free_port()
        self.spawn(["node", self.entry, "--host", "127.0.0.1", "--http-port", str(self.port)])
        wait_listening(self.port, self.process, self.log_path)

    def describe(self):
        return f"piping-server 1.12.9 (node {node_version()})"


def node_version():
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


NGINX_CONF = """\
worker_processes {workers};
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


class NginxServer(Server):
    """nginx serving the payload files as static files with sendfile: the ceiling."""

    name = "nginx"
    has_producer = False

    def __init__(self, workdir, root, workers):
        super().__init__(workdir)
        self.root = root
        self.workers = workers

    def start(self):
        self.port = free_port()
        prefix = tempfile.mkdtemp(prefix="nginx-", dir=self.workdir)
        conf_path = os.path.join(prefix, "nginx.conf")
        with open(conf_path, "w") as conf:
            conf.write(NGINX_CONF.format(workers=self.workers, prefix=prefix, port=self.port,
                                         root=self.root))
        self.spawn([nginx_binary(), "-p", prefix, "-c", conf_path, "-e", f"{prefix}/error.log"])
        self.log_path = os.path.join(prefix, "error.log")
        wait_listening(self.port, self.process, self.log_path)

    def describe(self):
        return f"nginx ({nginx_version()}), sendfile on, {self.workers} workers"


def nginx_binary():
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.path.exists(candidate):
            return candidate
    return "nginx"


def nginx_version():
    try:
        result = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True,
                                timeout=10)
        return result.stderr.strip().split(":", 1)[-1].strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
