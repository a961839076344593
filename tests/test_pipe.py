"""The pipe state machine (relayd/pipe.py): its rules, as properties, not the table restated.

Pipes are driven only through their facts (`join`, `leave`, `receiver_ended`, `sender_lost`,
`apply` of slot and body events), so every count-triggered move comes from `settle()`. A
random walk over thousands of legal fact sequences checks the invariants that hold whatever
the order: counts and state agree, nothing goes back to WAITING, every receiver resolved
closes a started pipe, and ABORTED never turns into a clean end.
"""
from __future__ import annotations

import random

import pytest

from relayd.control import Outcome
from relayd.pipe import TRANSITIONS, Event, IllegalTransition, Pipe, PipeState

S, E = PipeState, Event
SENDER = (0, 1)


def receivers(n: int) -> list[tuple[int, int]]:
    return [(i % 2, 100 + i) for i in range(n)]


def started(n: int) -> Pipe:
    """A pipe whose sender and n receivers joined and which got a slot."""
    pipe = Pipe(b"/p", n)
    pipe.join(SENDER, "sender", None)
    for party in receivers(n):
        pipe.join(party, "receiver", None)
    assert pipe.state is S.MATCHED
    pipe.apply(E.slot_assigned)
    return pipe


def test_a_pipe_is_matched_exactly_when_its_sender_and_n_receivers_are_present():
    for order in ("sender first", "sender last", "sender in the middle"):
        pipe = Pipe(b"/p", 3)
        parties = [(p, "receiver") for p in receivers(3)]
        at = {"sender first": 0, "sender last": 3, "sender in the middle": 1}[order]
        parties.insert(at, (SENDER, "sender"))
        for k, (party, role) in enumerate(parties):
            fired = pipe.join(party, role, None)
            last = k == len(parties) - 1
            assert (pipe.state is S.MATCHED) == last, (order, k)
            assert (E.all_joined in fired) == last


def test_the_last_party_leaving_a_waiting_pipe_closes_it_and_an_earlier_one_does_not():
    pipe = Pipe(b"/p", 3)
    pipe.join(SENDER, "sender", None)
    pipe.join((1, 5), "receiver", None)
    assert pipe.leave(SENDER) == [] and pipe.state is S.WAITING
    assert pipe.leave((1, 5)) == [E.last_party_left] and pipe.state is S.CLOSED


def test_a_party_that_leaves_no_longer_counts_toward_n():
    pipe = Pipe(b"/p", 2)
    pipe.join(SENDER, "sender", None)
    pipe.join((1, 5), "receiver", None)
    pipe.leave((1, 5))
    pipe.join((1, 6), "receiver", None)
    assert pipe.state is S.WAITING
    pipe.join((0, 7), "receiver", None)
    assert pipe.state is S.MATCHED and pipe.receivers == [(1, 6), (0, 7)]


@pytest.mark.parametrize("n", [1, 3])
def test_when_every_receiver_is_done_after_the_body_ended_the_pipe_closes_from_draining(n):
    pipe = started(n)
    pipe.apply(E.body_ended)
    for k, party in enumerate(receivers(n)):
        pipe.receiver_ended(party, ok=True)
        assert (pipe.state is S.CLOSED) == (k == n - 1)
    assert pipe.closed_from is S.DRAINING and pipe.done_receivers == n


def test_a_receiver_that_saw_the_end_before_the_producers_report_drains_the_pipe():
    pipe = started(2)
    pipe.receiver_ended(receivers(2)[0], ok=True)        # DONE seen in the ring first
    assert pipe.state is S.DRAINING
    pipe.apply(E.body_ended)                             # the producer's late report
    assert pipe.state is S.DRAINING


def test_every_receiver_lost_mid_body_closes_the_pipe_from_streaming():
    pipe = started(2)
    pipe.receiver_ended(receivers(2)[0], ok=False)
    assert pipe.state is S.STREAMING
    assert pipe.receiver_ended(receivers(2)[1], ok=False) == [E.last_receiver_lost]
    assert pipe.closed_from is S.STREAMING


def test_an_aborted_pipe_closes_only_when_every_receiver_is_resolved_and_never_drains():
    pipe = started(3)
    pipe.sender_lost(Outcome.WORKER_DIED, "the sender's worker died")
    assert pipe.state is S.ABORTED and pipe.outcome is Outcome.WORKER_DIED
    for k, party in enumerate(receivers(3)):
        pipe.receiver_ended(party, ok=False)
        assert (pipe.state is S.CLOSED) == (k == 2)
    assert pipe.closed_from is S.ABORTED


def test_a_sender_lost_after_the_body_ended_does_not_turn_a_clean_end_into_an_abort():
    pipe = started(1)
    pipe.apply(E.body_ended)
    pipe.sender_lost(Outcome.SENDER_LOST, "gone after its last byte")
    assert pipe.state is S.DRAINING and pipe.outcome is Outcome.SENDER_LOST
    pipe.receiver_ended(receivers(1)[0], ok=True)
    assert pipe.closed_from is S.DRAINING


def test_an_illegal_move_raises_naming_state_and_event_and_leaves_the_pipe_as_it_was():
    pipe = started(1)
    with pytest.raises(IllegalTransition) as caught:
        pipe.apply(E.all_joined)
    assert caught.value.state is S.STREAMING and caught.value.event is E.all_joined
    assert "streaming" in str(caught.value) and "all_joined" in str(caught.value)
    assert pipe.state is S.STREAMING


def test_closed_is_final():
    pipe = Pipe(b"/p", 1)
    pipe.join(SENDER, "sender", None)
    pipe.leave(SENDER)
    assert pipe.state is S.CLOSED
    for event in Event:
        with pytest.raises(IllegalTransition):
            pipe.apply(event)


def _random_life(rng: random.Random) -> Pipe:
    """One pipe driven by a random legal sequence of facts, checking invariants each step."""
    n = rng.randint(1, 4)
    pipe = Pipe(b"/walk", n)
    joined: list = []
    ever_started = False
    next_conn = 0
    while pipe.state is not S.CLOSED:
        before = pipe.state
        if pipe.state is S.WAITING:
            choices = []
            if pipe.sender is None:
                choices.append("sender")
            if len(pipe.receivers) < n:
                choices.append("receiver")
            if joined:
                choices.append("leave")
            if not choices or rng.random() < 0.02:
                pipe.apply(E.wait_timed_out)
                break
            pick = rng.choice(choices)
            if pick == "leave":
                party = joined.pop(rng.randrange(len(joined)))
                pipe.leave(party)
            else:
                next_conn += 1
                party = (rng.randrange(2), next_conn)
                joined.append(party)
                pipe.join(party, pick, None)
        elif pipe.state is S.MATCHED:
            if rng.random() < 0.1:
                pipe.apply(E.no_slot)
            else:
                pipe.apply(E.slot_assigned)
                ever_started = True
        else:
            open_ = [p for p in pipe.receivers if p not in pipe.resolved]
            pick = rng.random()
            if pick < 0.15 and pipe.state is S.STREAMING:
                pipe.apply(E.body_ended)
            elif pick < 0.25:
                pipe.sender_lost(Outcome.SENDER_LOST, "test")
            else:
                ok = pipe.state is not S.ABORTED and rng.random() < 0.7
                pipe.receiver_ended(rng.choice(open_), ok=ok)
        # Invariants after every fact.
        assert pipe.state is not S.WAITING or before is S.WAITING, "back to waiting"
        assert pipe.unresolved_receivers >= 0
        if pipe.state in (S.STREAMING, S.DRAINING, S.ABORTED):
            assert pipe.unresolved_receivers > 0, "a started pipe with nobody left is closed"
        if before is S.ABORTED:
            assert pipe.state in (S.ABORTED, S.CLOSED)
        if pipe.state is S.WAITING:
            assert not (pipe.sender is not None and len(pipe.receivers) == n)
    if ever_started:
        assert pipe.done_receivers + pipe.lost_receivers == n
    return pipe


def test_a_thousand_random_lives_keep_every_invariant_and_all_end_closed():
    rng = random.Random(1234)
    ends = {}
    for _ in range(1000):
        pipe = _random_life(rng)
        assert pipe.state is S.CLOSED
        ends[pipe.closed_from] = ends.get(pipe.closed_from, 0) + 1
    # The walk reached every way out, so the invariants were checked on each.
    assert set(ends) >= {S.WAITING, S.MATCHED, S.STREAMING, S.DRAINING, S.ABORTED}


def test_every_state_can_reach_closed():
    """No state is a trap: from each, some sequence of events leads to CLOSED."""
    reaches = {S.CLOSED}
    changed = True
    while changed:
        changed = False
        for state, row in TRANSITIONS.items():
            if state not in reaches and set(row.values()) & reaches:
                reaches.add(state)
                changed = True
    assert reaches == set(PipeState)
