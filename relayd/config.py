"""Frozen configuration: every limit and default of the daemon in one place.

Defaults follow nginx/HAProxy/Node practice (DESIGN §5). `Config.validate()` raises
`ConfigError` with a sentence a user can act on; the CLI prints it and exits 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile

TRANSMIT_MODES = ("auto", "copy", "sendfile", "splice")
SLOW_POLICIES = ("block", "drop")
LOG_FORMATS = ("text", "json")
PUNCH_BLOCK_BYTES = 256 * 1024          # B: the unit in which ring pages are punched
MAX_RECEIVERS = 256
MIN_WORKER_TIMEOUT_S = 2.0              # two of the workers' once-a-second heartbeats


class ConfigError(ValueError):
    """A setting a user gave that cannot work; the message says which and why."""


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = dataclasses.field(default_factory=default_workers)
    window: int = 4 * 1024 * 1024            # ring capacity per streaming pipe, power of 2
    max_pipes: int = 10_000                  # pipes in the registry (waiting + streaming)
    max_transfers: int = 1024                # pipes streaming at once (ring slots)
    transmit: str = "auto"
    # auto: sendfile when n >= this. Measured here (scripts/quick_fanout.py, curl receivers on
    # loopback): copy used 0.67x sendfile's CPU/GB at n=50, sendfile 0.95x copy's at n=256.
    sendfile_from_n: int = 128
    max_connections: int = 20_000            # per worker
    max_uri_bytes: int = 8 * 1024            # 414 beyond
    max_header_bytes: int = 16 * 1024        # 431 beyond
    max_header_count: int = 100              # 431 beyond
    head_timeout_s: float = 10.0             # absolute deadline for the request head (408)
    keepalive_timeout_s: float = 15.0
    rendezvous_timeout_s: float = 300.0      # a pipe nobody completes does not live forever
    graceful_timeout_s: float = 30.0
    receiver_stall_timeout_s: float = 60.0   # unsent bytes, no progress: close (send_timeout)
    # A model may load for minutes before its first token: senders get longer than receivers.
    sender_idle_timeout_s: float = 300.0
    worker_timeout_s: float = 30.0           # no heartbeat for this long: kill and replace
    secret_file: str | None = None           # access control off unless given (relayd/auth.py)
    # Spill (relayd/spill.py): lag beyond the window goes to an unlinked file per pipe.
    spill_dir: str = dataclasses.field(default_factory=tempfile.gettempdir)
    spill_limit: int = 1 << 30               # per pipe: bytes the slowest may lag; 0 = no spill
    spill_budget: int = 8 << 30              # all pipes of the daemon (split evenly by worker)
    # Past the limit: block holds the producer (lossless, the default: nothing is lost, and a
    # 1 GiB lag is pathological for token streams); drop cuts the slowest (a short body).
    slow: str = "block"
    log_format: str = "text"
    access_log: bool = False

    @property
    def punch_block(self) -> int:
        return PUNCH_BLOCK_BYTES

    @property
    def worker_slots(self) -> int:
        """Worker indexes (and eventfds) made before the first fork: 2W, so a reload overlaps."""
        return 2 * self.workers

    def validate(self) -> "Config":
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be 0..65535 (0 picks a free port)")
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"--workers {self.workers}: must be 1..256")
        w = self.window
        if w < 2 * PUNCH_BLOCK_BYTES or w & (w - 1) or w > 1 << 30:
            raise ConfigError(
                f"--window {w}: must be a power of two from {2 * PUNCH_BLOCK_BYTES} "
                f"(two punch blocks) to {1 << 30}")
        if not 1 <= self.max_transfers <= 65536:
            raise ConfigError(f"--max-transfers {self.max_transfers}: must be 1..65536")
        if self.max_pipes < 1:
            raise ConfigError(f"--max-pipes {self.max_pipes}: must be at least 1")
        if self.max_connections < 1:
            raise ConfigError(f"--max-connections {self.max_connections}: must be at least 1")
        if self.max_uri_bytes < 64 or self.max_header_bytes < 1024 or self.max_header_count < 8:
            raise ConfigError("request head limits below 64-byte URIs, 1 KiB of header fields "
                              "or 8 fields would refuse ordinary clients")
        if self.slow not in SLOW_POLICIES:
            raise ConfigError(f"--slow {self.slow}: must be block or drop")
        if self.spill_limit < 0 or self.spill_budget < 0:
            raise ConfigError("--spill-limit and --spill-budget must be >= 0")
        if self.spill_limit and not os.path.isdir(self.spill_dir):
            raise ConfigError(f"--spill-dir {self.spill_dir}: not a directory")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format {self.log_format}: must be text or json")
        if self.transmit not in TRANSMIT_MODES:
            raise ConfigError(f"--transmit {self.transmit}: must be one of "
                              f"{', '.join(TRANSMIT_MODES)}")
        if not 1 <= self.sendfile_from_n <= MAX_RECEIVERS + 1:
            raise ConfigError(f"--sendfile-from-n {self.sendfile_from_n}: must be 1..257")
        for name in ("head_timeout_s", "keepalive_timeout_s", "rendezvous_timeout_s",
                     "graceful_timeout_s", "receiver_stall_timeout_s", "sender_idle_timeout_s",
                     "worker_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):        # nan compares false to all
                raise ConfigError(f"--{name[:-2].replace('_', '-')}: must be > 0 seconds")
        if self.worker_timeout_s < MIN_WORKER_TIMEOUT_S:
            raise ConfigError(f"--worker-timeout {self.worker_timeout_s:g}: must be at least "
                              f"{MIN_WORKER_TIMEOUT_S:g} s (workers beat once a second: less "
                              "kills healthy ones)")
        return self

    def transmit_for(self, n: int) -> str:
        """How a pipe with n receivers moves its bytes: 'splice' (n = 1, both sockets in the
        sender's worker, no ring), or through the ring with 'copy' or 'sendfile'. auto and
        splice splice every n = 1 pipe; copy and sendfile name the ring's mode for all."""
        if self.transmit in ("copy", "sendfile"):
            return self.transmit
        if n == 1:
            return "splice"
        return "sendfile" if n >= self.sendfile_from_n else "copy"
