"""Installs what the benchmark needs and the repo does not pin: piping-server, nginx, matplotlib.

Each step prints what it runs. A step that cannot succeed raises MissingDependency with the
reason (callers decide: the CLI exits, the smoke test skips).
"""
import os
import shutil
import subprocess
import sys

PIPING_SERVER_VERSION = "1.12.9"
INSTALL_TIMEOUT_S = 600


class MissingDependency(RuntimeError):
    """A tool the benchmark needs is absent and could not be installed."""


def run_install(argv, **kwargs):
    print("bench: installing:", " ".join(argv), flush=True)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                              **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingDependency(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise MissingDependency(f"{' '.join(argv)} exited {done.returncode}: "
                                f"{(done.stderr or done.stdout)[-500:]}")


def piping_server_entry(cache_dir):
    return os.path.join(cache_dir, "node_modules", "piping-server", "dist", "src", "index.js")


def ensure_piping_server(cache_dir):
    """piping-server@1.12.9 under cache_dir (npm install --prefix), node on PATH."""
    if shutil.which("node") is None:
        raise MissingDependency("node is not installed (apt-get install nodejs npm)")
    if os.path.exists(piping_server_entry(cache_dir)):
        return
    if shutil.which("npm") is None:
        raise MissingDependency("npm is not installed (apt-get install npm)")
    os.makedirs(cache_dir, exist_ok=True)
    run_install(["npm", "install", "--no-audit", "--no-fund", "--prefix", cache_dir,
                 f"piping-server@{PIPING_SERVER_VERSION}"])
    if not os.path.exists(piping_server_entry(cache_dir)):
        raise MissingDependency("npm install finished but piping-server is missing")


def ensure_nginx():
    """nginx from Debian's package when missing (needs root)."""
    if any(os.path.exists(p) for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")) \
            or shutil.which("nginx"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise MissingDependency("nginx is missing and apt-get as root is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_install(["apt-get", "update", "-qq"], env=env)
    run_install(["apt-get", "install", "-y", "-qq", "nginx"], env=env)


def ensure_curl():
    if shutil.which("curl") is None:
        raise MissingDependency("curl is not installed (apt-get install curl)")


def ensure_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        run_install([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
