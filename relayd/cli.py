"""argv -> Config -> Supervisor.run(). Bad flags: a clear message and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
import tomllib

from relayd import __version__
from relayd.config import (LOG_FORMATS, SLOW_POLICIES, TRANSMIT_MODES, Config, ConfigError,
                           default_workers)


SUBCOMMANDS = {
    # name: (module, what it does) -- each module has main(argv) -> exit status
    "sign": ("relayd.sign", "print a signed send or receive URL"),
    "forward": ("relayd.forward", "relay a pipe of this node into a pipe of another"),
}


def size(text: str) -> int:
    """'4M', '512k', '1048576' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except (ValueError, OverflowError):                  # "x", or "infk"
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4M, 512k)") from None


# flag, Config field, parser, help. One table: flags, RELAYD_* variables and config-file keys
# all come from it, so the three can never disagree.
OPTIONS = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "TCP port; 0 picks a free one"),
    ("--workers", "workers", int, "worker processes (default: CPUs available)"),
    ("--window", "window", size, "ring bytes per streaming pipe (power of two): how far the "
                                 "fastest receiver may lead the slowest"),
    ("--max-pipes", "max_pipes", int, "pipes known at once, waiting or streaming (503 beyond)"),
    ("--max-transfers", "max_transfers", int,
     "pipes of n >= 2 streaming at once: ring slots in the arena (more wait in line for "
     "one, within --rendezvous-timeout)"),
    ("--transmit", "transmit", str, "copy: send() from the ring; sendfile: zero-copy from the "
                                    "memfd; splice: n = 1 pipes move socket to socket in the "
                                    "kernel (others as auto); auto: splice for n = 1, copy or "
                                    "sendfile by n"),
    ("--sendfile-from-n", "sendfile_from_n", int,
     "with --transmit auto: pipes with n >= this use sendfile"),
    ("--max-connections", "max_connections", int, "connections per worker (503 beyond)"),
    ("--rendezvous-timeout", "rendezvous_timeout_s", float,
     "seconds a pipe may wait for its sender and receivers"),
    ("--head-timeout", "head_timeout_s", float,
     "seconds a client has to send its request head (408)"),
    ("--keepalive-timeout", "keepalive_timeout_s", float,
     "seconds an idle kept-alive connection stays open"),
    ("--graceful-timeout", "graceful_timeout_s", float,
     "seconds SIGTERM waits for streaming transfers before aborting them"),
    ("--receiver-stall-timeout", "receiver_stall_timeout_s", float,
     "seconds a receiver with bytes to take may make no progress before it is closed (its "
     "body ends short; the others go on)"),
    ("--sender-idle-timeout", "sender_idle_timeout_s", float,
     "seconds a streaming sender may send nothing before its transfer aborts"),
    ("--worker-timeout", "worker_timeout_s", float,
     "seconds without a worker heartbeat before it is killed and replaced"),
    ("--secret-file", "secret_file", str,
     "keys and tokens (0600 file): when given, every pipe request needs a signed URL or a "
     "bearer token; see `relayd sign --help`"),
    ("--spill-dir", "spill_dir", str,
     "where lag beyond the window spills (files are unlinked at once, mode 0600)"),
    ("--spill-limit", "spill_limit", size,
     "bytes the slowest receiver of a pipe may lag through the spill file; 0 turns spill off"),
    ("--spill-budget", "spill_budget", size, "spill bytes for all pipes together"),
    ("--slow", "slow", str, "past the spill limit: block (hold the producer, lossless) or "
                            "drop (cut the slowest; it sees a short body); a sender may choose "
                            "per pipe with ?slow=block|drop"),
    ("--log-format", "log_format", str, "text or json lines on stderr"),
    ("--access-log", "access_log", bool, "one line per request (off by default)"),
]
ENV_PREFIX = "RELAYD_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag[2:].replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    d = Config(workers=default_workers())
    p = argparse.ArgumentParser(
        prog="relayd",
        description="HTTP pipe daemon: `PUT /path?n=N` streams once, N x `GET /path?n=N` "
                    "receive identical bytes. Settings come from, lowest first: defaults, "
                    "the config file (--config or $RELAYD_CONFIG, TOML), RELAYD_* environment "
                    "variables (e.g. RELAYD_PORT), flags.",
        epilog="subcommands: " + "; ".join(f"relayd {k}: {v}"
                                            for k, (_, v) in SUBCOMMANDS.items()))
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    p.add_argument("--config", help="TOML file of settings (keys as the flags: port = 8080)")
    p.add_argument("--check", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    for flag, field, kind, text in OPTIONS:
        default = getattr(d, field)
        text = f"{text} [default: {default}; env {env_name(flag)}]"
        if kind is bool:
            p.add_argument(flag, action="store_const", const=True, default=None, help=text)
        elif field == "transmit":
            p.add_argument(flag, choices=TRANSMIT_MODES, default=None, help=text)
        elif field == "log_format":
            p.add_argument(flag, choices=LOG_FORMATS, default=None, help=text)
        elif field == "slow":
            p.add_argument(flag, choices=SLOW_POLICIES, default=None, help=text)
        else:
            p.add_argument(flag, type=kind, default=None, help=text)
    return p


def resolve(args: argparse.Namespace, environ) -> tuple[Config, dict[str, str]]:
    """Merge defaults < config file < environment < flags; returns (Config, field -> source)."""
    values: dict = {}
    source: dict[str, str] = {}
    path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"--config {path}: {e}") from None
        known = {flag[2:].replace("-", "_"): (field, kind) for flag, field, kind, _ in OPTIONS}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"--config {path}: unknown setting {key!r}")
            field, kind = known[name]
            values[field] = _convert(kind, value, f"{path}: {key}")
            source[field] = f"file {path}"
    for flag, field, kind, _ in OPTIONS:
        name = env_name(flag)
        given = getattr(args, field_attr(flag))
        if given is not None:            # a flag wins: the variable it overrides is not read
            values[field] = given
            source[field] = f"flag {flag}"
        elif name in environ:
            values[field] = _convert(kind, environ[name], name)
            source[field] = f"env {name}"
    config = Config(**values).validate()
    return config, source


def field_attr(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _convert(kind, value, where: str):
    try:
        if kind is bool:
            return value if isinstance(value, bool) else parse_bool(value)
        if isinstance(value, bool) or (kind in (int, size) and isinstance(value, float)):
            # TOML: `port = true` is not port 1, nor `workers = 2.9` two workers
            raise ValueError(f"{value!r} is not {'a size' if kind is size else 'an integer'}")
        if kind is size:
            return value if isinstance(value, int) else size(str(value))
        return kind(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def print_check(config: Config, source: dict[str, str]) -> None:
    print(f"relayd {__version__}: settings (defaults < config file < environment < flags)")
    for flag, field, _, _ in OPTIONS:
        print(f"  {flag[2:]:24} {getattr(config, field)!s:24} {source.get(field, 'default')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, source = resolve(args, os.environ)
    except ConfigError as e:
        parser.error(str(e))
    if args.check:
        print_check(config, source)
        return 0
    from relayd.supervisor import serve          # after parsing: --help stays fast
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
