"""The pipe state machine, straight from its table: `relayd.pipe.TRANSITIONS`.

Every (state, event) pair in the table moves to the table's state through `Pipe.apply`; every
pair not in it raises `IllegalTransition` naming both. A pipe is brought to each state only
through `apply` (a route of legal events found in the table), never by assigning `state`.
"""
from __future__ import annotations

from collections import deque

import pytest

from relayd.pipe import TRANSITIONS, Event, IllegalTransition, Pipe, PipeState

LEGAL = [(state, event, target)
         for state, row in TRANSITIONS.items() for event, target in row.items()]
ILLEGAL = [(state, event)
           for state in PipeState for event in Event if event not in TRANSITIONS[state]]


def route_to(goal: PipeState) -> list[Event]:
    """The shortest list of events that takes a new pipe from WAITING to `goal` (BFS)."""
    seen = {PipeState.WAITING: []}
    queue = deque([PipeState.WAITING])
    while queue:
        state = queue.popleft()
        if state is goal:
            return seen[state]
        for event, target in TRANSITIONS[state].items():
            if target not in seen:
                seen[target] = seen[state] + [event]
                queue.append(target)
    raise AssertionError(f"state {goal.value} cannot be reached from waiting")


def pipe_in(state: PipeState) -> Pipe:
    pipe = Pipe(b"/table", 1)
    for event in route_to(state):
        pipe.apply(event)
    assert pipe.state is state
    return pipe


def test_a_new_pipe_starts_waiting():
    assert Pipe(b"/new", 3).state is PipeState.WAITING


def test_every_state_has_a_row_in_the_table_and_is_reachable_from_waiting():
    assert set(TRANSITIONS) == set(PipeState)
    for state in PipeState:
        pipe_in(state)


@pytest.mark.parametrize("state,event,target", LEGAL,
                         ids=[f"{s.value}-{e.value}" for s, e, _ in LEGAL])
def test_every_pair_in_the_table_moves_to_the_tables_state(state, event, target):
    pipe = pipe_in(state)
    assert pipe.apply(event) is target
    assert pipe.state is target


@pytest.mark.parametrize("state,event", ILLEGAL,
                         ids=[f"{s.value}-{e.value}" for s, e in ILLEGAL])
def test_every_pair_not_in_the_table_raises_illegal_transition_naming_state_and_event(state, event):
    pipe = pipe_in(state)
    with pytest.raises(IllegalTransition) as caught:
        pipe.apply(event)
    assert caught.value.state is state
    assert caught.value.event is event
    assert state.value in str(caught.value) and event.value in str(caught.value)
    assert pipe.state is state, "an illegal event must not move the pipe"


def test_closed_has_no_exits():
    assert TRANSITIONS[PipeState.CLOSED] == {}
    pipe = pipe_in(PipeState.CLOSED)
    for event in Event:
        with pytest.raises(IllegalTransition):
            pipe.apply(event)
        assert pipe.state is PipeState.CLOSED


def test_no_state_but_waiting_leads_back_to_waiting():
    for state, event, target in LEGAL:
        if target is PipeState.WAITING:
            assert state is PipeState.WAITING, f"{state.value} --{event.value}--> waiting"
