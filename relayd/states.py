"""The base of the state and event enums that key relayd's transition tables.

Enum's own `__hash__` is Python code (`hash(self._name_)`), and every table lookup hashes a
state and an event: at thousands of pipes a second that was a measurable share of the
supervisor's time. Members are singletons compared by identity, so the C identity hash is
consistent with their equality; pickling and value lookup (`State("x")`) are unchanged.
"""
from __future__ import annotations

import enum


class State(enum.Enum):
    __hash__ = object.__hash__
