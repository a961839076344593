"""One pipe's life as the supervisor sees it: states, events, and the table between them. No I/O.

Rules:
- A pipe is born WAITING when its first party arrives and never goes back to WAITING.
- STREAMING starts only when the sender and all n receivers are present (`all_joined`).
- DRAINING: the sender's body ended cleanly; receivers finish at their own pace.
- ABORTED: the body will not complete (sender lost); it reaches every receiver as a short body.
- CLOSED: the registry forgets the path (it is free for a new pipe). The ring slot may outlive
  it until every worker has released it; that is the slot table's business, not the pipe's.
`Pipe.apply(event)` is the only code that assigns `pipe.state`; a move the table does not hold
raises `IllegalTransition(state, event)`.
"""
from __future__ import annotations

import enum
import time


class PipeState(enum.Enum):
    WAITING = "waiting"
    STREAMING = "streaming"
    DRAINING = "draining"
    ABORTED = "aborted"
    CLOSED = "closed"


class Event(enum.Enum):
    sender_joined = "sender_joined"
    receiver_joined = "receiver_joined"
    party_left = "party_left"
    last_party_left = "last_party_left"
    all_joined = "all_joined"
    no_slot = "no_slot"                       # all joined but every ring slot is busy
    wait_timed_out = "wait_timed_out"
    receiver_done = "receiver_done"
    receiver_lost = "receiver_lost"
    last_receiver_lost = "last_receiver_lost"   # mid-body: nobody left to send to
    last_receiver_gone = "last_receiver_gone"   # after the body ended or the pipe aborted
    body_ended = "body_ended"
    sender_lost = "sender_lost"


S, E = PipeState, Event
TRANSITIONS: dict[PipeState, dict[Event, PipeState]] = {
    S.WAITING: {E.sender_joined: S.WAITING, E.receiver_joined: S.WAITING,
                E.party_left: S.WAITING, E.last_party_left: S.CLOSED,
                E.all_joined: S.STREAMING, E.no_slot: S.CLOSED, E.wait_timed_out: S.CLOSED},
    S.STREAMING: {E.receiver_lost: S.STREAMING, E.body_ended: S.DRAINING,
                  E.sender_lost: S.ABORTED, E.last_receiver_lost: S.CLOSED},
    S.DRAINING: {E.receiver_done: S.DRAINING, E.receiver_lost: S.DRAINING,
                 E.sender_lost: S.DRAINING, E.last_receiver_gone: S.CLOSED},
    S.ABORTED: {E.receiver_lost: S.ABORTED, E.sender_lost: S.ABORTED,
                E.last_receiver_gone: S.CLOSED},
    S.CLOSED: {},
}


class IllegalTransition(RuntimeError):
    def __init__(self, state: PipeState, event: Event):
        super().__init__(f"pipe in state {state.value} cannot take event {event.value}")
        self.state = state
        self.event = event


Party = tuple  # (worker index, connection id): unique while the connection lives


class Pipe:
    """A path's rendezvous and, once streaming, its transfer's bookkeeping."""

    def __init__(self, path: bytes, n: int):
        self.path = path
        self.n = n
        self.state = PipeState.WAITING
        self.created = time.monotonic()
        self.started = 0.0
        self.sender: Party | None = None
        self.sender_info: dict | None = None
        self.receivers: list[Party] = []
        self.slot = -1
        self.gen = 0
        self.transmit = ""
        self.done_receivers = 0
        self.lost_receivers = 0
        self.body_bytes = 0
        self.resolved: set[Party] = set()
        self.abort_reason = "sender lost"

    def apply(self, event: Event) -> PipeState:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        return self.state

    @property
    def unresolved_receivers(self) -> int:
        return len(self.receivers) - self.done_receivers - self.lost_receivers

    def workers(self) -> set[int]:
        """Worker indexes holding a party of this pipe."""
        found = {w for w, _ in self.receivers}
        if self.sender is not None:
            found.add(self.sender[0])
        return found
