"""Refusal counting for access control: a table in anonymous shared memory, made by the
first `shared()` call.

The supervisor makes that call before it forks, so every worker (and every worker a SIGHUP
starts) inherits the same table and the limit holds per address across workers. Updates are
unlocked read-modify-writes of 8-byte words: two workers racing on one address may lose one
count, which a rate limit can afford. Time is CLOCK_MONOTONIC seconds, the same in every
process and immune to steps of the wall clock.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import time

FAILURE_LIMIT = 20                       # refusals per address per window, then 429
FAILURE_WINDOW_S = 60


class FailureTable:
    """Refusals per client address in shared memory: slot = [address hash | start<<32 | count].

    Open addressing over PROBES slots; a stale or free slot is reused, and when all are live
    the one whose window started first is evicted (that address merely gets a fresh count).
    """

    SLOTS = 4096
    PROBES = 8

    def __init__(self):
        self.mem = mmap.mmap(-1, self.SLOTS * 16)      # MAP_SHARED|MAP_ANONYMOUS: fork keeps it
        self.words = memoryview(self.mem).cast("Q")    # aligned 8-byte loads and stores
        # Keyed hash: a client cannot pick addresses that crowd out another's slot.
        self.salt = os.urandom(16)

    def _hash(self, address: str) -> int:
        h = int.from_bytes(hashlib.blake2b(address.encode(), key=self.salt,
                                           digest_size=8).digest(), "little")
        return h or 1                    # 0 marks a free slot

    def _find(self, h: int) -> int | None:
        start = h % self.SLOTS
        for i in range(self.PROBES):
            slot = (start + i) % self.SLOTS
            if self.words[2 * slot] == h:
                return slot
        return None

    def retry_after(self, address: str, now: int) -> int:
        """Seconds this address must wait; 0 = not blocked."""
        slot = self._find(self._hash(address))
        if slot is None:
            return 0
        v = self.words[2 * slot + 1]
        started, count = v >> 32, v & 0xFFFFFFFF
        left = started + FAILURE_WINDOW_S - now
        return max(1, left) if count >= FAILURE_LIMIT and left > 0 else 0

    def record(self, address: str, now: int) -> None:
        h = self._hash(address)
        slot = self._find(h)
        if slot is None:
            start = h % self.SLOTS
            candidates = [(start + i) % self.SLOTS for i in range(self.PROBES)]
            slot = min(candidates, key=lambda s: (self.words[2 * s] != 0
                                                  and (self.words[2 * s + 1] >> 32)
                                                  + FAILURE_WINDOW_S > now,
                                                  self.words[2 * s + 1] >> 32))
            self.words[2 * slot + 1] = 0
            self.words[2 * slot] = h
        v = self.words[2 * slot + 1]
        started, count = v >> 32, v & 0xFFFFFFFF
        if count == 0 or now - started >= FAILURE_WINDOW_S:
            started, count = now, 0
        self.words[2 * slot + 1] = (started << 32) | min(count + 1, 0xFFFFFFFF)


_table: FailureTable | None = None       # made in the supervisor, inherited by the workers


def shared() -> FailureTable:
    global _table
    if _table is None:
        _table = FailureTable()
    return _table


def now_s() -> int:
    return int(time.monotonic())         # CLOCK_MONOTONIC is system-wide: same in every worker
