"""One pipe's life as the supervisor sees it: states, events, rules and the table between
them. No I/O (after h11's _state.py: rules first, transitions as tables, fixed points).

Rules:
- A pipe is born WAITING when its first party arrives. It never goes back to WAITING once a
  transfer started (only from MATCHED, when a party of a pipe still waiting for a slot leaves).
- MATCHED: the sender and all n receivers are present (`all_joined`); the registry gives it a
  ring slot (`slot_assigned`: STREAMING), or it waits in line for one -- a party leaving
  meanwhile makes it WAITING again, the rendezvous timeout closes it.
- DRAINING: the sender's body ended cleanly; receivers finish at their own pace.
- ABORTED: the body will not complete (sender lost); it reaches every receiver as a short body.
- CLOSED: the registry forgets the path (it is free for a new pipe). The ring slot may outlive
  it until every worker has released it; that is the slot table's business, not the pipe's.

Two kinds of event move a pipe. Facts come from outside (a party joined or left, a receiver
ended, the body ended, the sender was lost, a slot was assigned). Count-triggered events
follow from the pipe's own counts -- everyone is here, nobody is left, every receiver is
resolved -- and `settle()` fires them, to a fixed point, after every fact. `apply` is the
only code that assigns `state`; a move the table does not hold raises
`IllegalTransition(state, event)`.
"""
from __future__ import annotations

import time

from relayd.control import Outcome, SenderInfo
from relayd.states import State


class PipeState(State):
    WAITING = "waiting"
    MATCHED = "matched"
    STREAMING = "streaming"
    DRAINING = "draining"
    ABORTED = "aborted"
    CLOSED = "closed"


class Event(State):
    # facts
    sender_joined = "sender_joined"
    receiver_joined = "receiver_joined"
    party_left = "party_left"
    wait_timed_out = "wait_timed_out"
    slot_assigned = "slot_assigned"
    no_slot = "no_slot"                       # all joined but every ring slot is busy
    receiver_done = "receiver_done"
    receiver_lost = "receiver_lost"
    body_ended = "body_ended"
    sender_lost = "sender_lost"
    # triggered by the pipe's counts (settle)
    all_joined = "all_joined"
    last_party_left = "last_party_left"
    last_receiver_lost = "last_receiver_lost"   # mid-body: nobody left to send to
    last_receiver_gone = "last_receiver_gone"   # after the body ended or the pipe aborted


S, E = PipeState, Event
TRANSITIONS: dict[PipeState, dict[Event, PipeState]] = {
    S.WAITING: {E.sender_joined: S.WAITING, E.receiver_joined: S.WAITING,
                E.party_left: S.WAITING, E.wait_timed_out: S.CLOSED,
                E.all_joined: S.MATCHED, E.last_party_left: S.CLOSED},
    S.MATCHED: {E.slot_assigned: S.STREAMING, E.no_slot: S.CLOSED,
                E.party_left: S.WAITING, E.wait_timed_out: S.CLOSED},
    S.STREAMING: {E.receiver_done: S.STREAMING, E.receiver_lost: S.STREAMING,
                  E.body_ended: S.DRAINING, E.sender_lost: S.ABORTED,
                  E.last_receiver_lost: S.CLOSED},
    S.DRAINING: {E.receiver_done: S.DRAINING, E.receiver_lost: S.DRAINING,
                 E.sender_lost: S.DRAINING, E.body_ended: S.DRAINING,
                 E.last_receiver_gone: S.CLOSED},
    S.ABORTED: {E.receiver_lost: S.ABORTED, E.sender_lost: S.ABORTED,
                E.body_ended: S.ABORTED, E.last_receiver_gone: S.CLOSED},
    S.CLOSED: {},
}


def _everyone_here(pipe: "Pipe") -> bool:
    return pipe.sender is not None and len(pipe.receivers) == pipe.n


def _nobody_here(pipe: "Pipe") -> bool:
    return pipe.sender is None and not pipe.receivers


def _all_resolved(pipe: "Pipe") -> bool:
    return pipe.unresolved_receivers == 0


# Count-triggered events: (state, condition, event), tried in order until none fires.
RULES = (
    (S.WAITING, _everyone_here, E.all_joined),
    (S.WAITING, _nobody_here, E.last_party_left),
    (S.STREAMING, _all_resolved, E.last_receiver_lost),
    (S.DRAINING, _all_resolved, E.last_receiver_gone),
    (S.ABORTED, _all_resolved, E.last_receiver_gone),
)


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
        self.sender_info: SenderInfo | None = None
        self.receivers: list[Party] = []
        self.slot = -1
        self.gen = 0
        self.transmit = ""
        self.done_receivers = 0
        self.lost_receivers = 0
        self.body_bytes = 0
        self.body_reported = False       # the producer's BodyEnded (its count) has come
        self.resolved: set[Party] = set()
        self.outcome = Outcome.SENDER_LOST
        self.abort_reason = "sender lost"
        self.closed_from: PipeState | None = None

    def apply(self, event: Event) -> PipeState:
        try:
            target = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        if target is PipeState.CLOSED:
            self.closed_from = self.state
        self.state = target
        return target

    def settle(self) -> list[Event]:
        """Fire the count-triggered events that now hold, to a fixed point; returns them."""
        fired = []
        progressed = True
        while progressed:
            progressed = False
            for state, holds, event in RULES:
                if self.state is state and holds(self):
                    self.apply(event)
                    fired.append(event)
                    progressed = True
                    break
        return fired

    # -- facts, each followed by settle() ---------------------------------------------------
    def join(self, party: Party, role: str, info: SenderInfo | None) -> list[Event]:
        if role == "sender":
            self.sender, self.sender_info = party, info
            self.apply(E.sender_joined)
        else:
            self.receivers.append(party)
            self.apply(E.receiver_joined)
        return self.settle()

    def leave(self, party: Party) -> list[Event]:
        if self.sender == party:
            self.sender = self.sender_info = None
        else:
            self.receivers.remove(party)
        self.apply(E.party_left)
        return self.settle()

    def receiver_ended(self, party: Party, ok: bool) -> list[Event]:
        self.resolved.add(party)
        if ok:
            if self.state is S.STREAMING:
                # The receiver saw the ring's DONE before the producer's report reached us.
                self.apply(E.body_ended)
            self.done_receivers += 1
            self.apply(E.receiver_done)
        else:
            self.lost_receivers += 1
            self.apply(E.receiver_lost)
        return self.settle()

    def sender_lost(self, outcome: Outcome, reason: str) -> list[Event]:
        if self.state is S.STREAMING:
            self.outcome, self.abort_reason = outcome, reason
        self.apply(E.sender_lost)
        return self.settle()

    @property
    def unresolved_receivers(self) -> int:
        return len(self.receivers) - self.done_receivers - self.lost_receivers

    def workers(self) -> set[int]:
        """Worker indexes holding a party of this pipe."""
        found = {w for w, _ in self.receivers}
        if self.sender is not None:
            found.add(self.sender[0])
        return found
