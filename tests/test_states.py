"""The worker state machine: the table is closed, every state can be stopped, and the
transitions the supervisor makes are exactly ones the table allows."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

from node.workers.states import TRANSITIONS, IllegalTransition, WorkerState, check_transition

S = WorkerState
WORKERS = Path(__file__).resolve().parent.parent / "node" / "workers"
WORKER_SRCS = (WORKERS / "replica.py", WORKERS / "ondemand.py")  # always and on-demand replicas


def reachable(start: WorkerState) -> set[WorkerState]:
    seen, todo = {start}, deque([start])
    while todo:
        for nxt in TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_table_covers_every_state():
    assert set(TRANSITIONS) == set(WorkerState)
    for targets in TRANSITIONS.values():
        assert targets <= set(WorkerState)


def test_every_state_reachable_and_stoppable():
    assert reachable(S.PENDING) == set(WorkerState)
    for state in WorkerState:
        assert S.STOPPED in reachable(state), f"{state} can never be stopped"


@pytest.mark.parametrize("old", list(WorkerState))
def test_illegal_transitions_raise(old):
    for new in WorkerState:
        if new in TRANSITIONS[old]:
            check_transition(old, new)
        else:
            with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
                check_transition(old, new)


def test_specific_rules():
    with pytest.raises(IllegalTransition):
        check_transition(S.STOPPED, S.READY)   # never ready without starting
    with pytest.raises(IllegalTransition):
        check_transition(S.PENDING, S.READY)
    with pytest.raises(IllegalTransition):
        check_transition(S.STOPPING, S.STARTING)  # a stop finishes first
    check_transition(S.FAILED, S.STARTING)       # an operator's restart leaves failed


def _targets_set_in_worker() -> set[WorkerState]:
    """Every state the replica modules move a replica to (`self._set(S.X, ...)`)."""
    found = set()
    for node in (n for src in WORKER_SRCS for n in ast.walk(ast.parse(src.read_text()))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("_set", "hold"):
            arg = node.args[0]
            if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "S":
                found.add(WorkerState[arg.attr])
    return found


def test_worker_only_uses_states_the_table_can_enter():
    used = _targets_set_in_worker()
    enterable = set().union(*TRANSITIONS.values())
    assert used, "no transitions found in node/workers/replica.py or ondemand.py"
    assert used <= enterable
    # The worker reaches every state but PENDING (where replicas begin) through _set.
    assert used == set(WorkerState) - {S.PENDING}
