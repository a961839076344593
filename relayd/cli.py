"""argv -> Config -> Supervisor.run(). Bad flags: a clear message and exit status 2."""
from __future__ import annotations

import argparse
import sys

from relayd import __version__
from relayd.config import TRANSMIT_MODES, Config, ConfigError, default_workers


SUBCOMMANDS = {
    # name: (module, what it does) -- each module has main(argv) -> exit status
    "sign": ("relayd.auth", "print a signed send or receive URL"),
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
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4M, 512k)") from None


def build_parser() -> argparse.ArgumentParser:
    d = Config(workers=1)
    p = argparse.ArgumentParser(
        prog="relayd",
        description="HTTP pipe daemon: `PUT /path?n=N` streams once, N x `GET /path?n=N` "
                    "receive identical bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=int, default=d.port, help="TCP port; 0 picks a free one")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="worker processes (default: CPUs available)")
    p.add_argument("--window", type=size, default=d.window,
                   help="ring bytes per streaming pipe (power of two): how far the fastest "
                        "receiver may lead the slowest")
    p.add_argument("--max-pipes", type=int, default=d.max_pipes,
                   help="pipes known at once, waiting or streaming (503 beyond)")
    p.add_argument("--max-transfers", type=int, default=d.max_transfers,
                   help="pipes streaming at once: ring slots in the arena (503 beyond)")
    p.add_argument("--transmit", choices=TRANSMIT_MODES, default=d.transmit,
                   help="copy: send() from the ring; sendfile: zero-copy from the memfd; "
                        "auto: per pipe by n")
    p.add_argument("--sendfile-from-n", type=int, default=d.sendfile_from_n,
                   help="with --transmit auto: pipes with n >= this use sendfile")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="connections per worker (503 beyond)")
    p.add_argument("--rendezvous-timeout", type=float, default=d.rendezvous_timeout_s,
                   help="seconds a pipe may wait for its sender and receivers")
    p.add_argument("--head-timeout", type=float, default=d.head_timeout_s,
                   help="seconds a client has to send its request head (408)")
    p.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout_s,
                   help="seconds an idle kept-alive connection stays open")
    p.add_argument("--graceful-timeout", type=float, default=d.graceful_timeout_s,
                   help="seconds SIGTERM waits for streaming transfers before aborting them")
    p.add_argument("--receiver-stall-timeout", type=float, default=d.receiver_stall_timeout_s,
                   help="seconds a receiver with bytes to take may make no progress before it is "
                        "closed (its body ends short; the others go on)")
    p.add_argument("--sender-idle-timeout", type=float, default=d.sender_idle_timeout_s,
                   help="seconds a streaming sender may send nothing before its transfer aborts")
    p.add_argument("--worker-timeout", type=float, default=d.worker_timeout_s,
                   help="seconds without a worker heartbeat before it is killed and replaced")
    p.add_argument("--secret-file", default=d.secret_file,
                   help="keys and tokens (0600 file): when given, every pipe request needs a "
                        "signed URL or a bearer token; see `relayd sign --help`")
    p.epilog = "subcommands: " + "; ".join(f"relayd {k}: {v}" for k, (_, v) in SUBCOMMANDS.items())
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host, port=args.port, workers=args.workers, window=args.window,
        max_pipes=args.max_pipes, max_transfers=args.max_transfers, transmit=args.transmit,
        sendfile_from_n=args.sendfile_from_n, max_connections=args.max_connections,
        rendezvous_timeout_s=args.rendezvous_timeout, head_timeout_s=args.head_timeout,
        keepalive_timeout_s=args.keepalive_timeout, graceful_timeout_s=args.graceful_timeout,
        receiver_stall_timeout_s=args.receiver_stall_timeout,
        sender_idle_timeout_s=args.sender_idle_timeout, worker_timeout_s=args.worker_timeout,
        secret_file=args.secret_file,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))
    from relayd.supervisor import serve          # after parsing: --help stays fast
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
