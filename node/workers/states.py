"""Worker states and the transitions allowed between them (no I/O, no imports)."""

from __future__ import annotations

from enum import Enum


class WorkerState(str, Enum):
    PENDING = "pending"          # desired, not started (waiting for placement or the store)
    STARTING = "starting"        # process launched (or adopted), waiting for readiness
    READY = "ready"              # serving traffic
    UNHEALTHY = "unhealthy"      # liveness probes failing; no traffic
    RESTARTING = "restarting"    # backing off before the next start
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"            # crash loop, missing runtime, bad store: needs a person
    UNLOADED = "unloaded"        # on-demand: no process (or one asleep) until a request or `load` asks
    LOADING = "loading"          # on-demand: launched (or woken) for a request, waiting for readiness


S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.PENDING: frozenset({S.STARTING, S.STOPPED, S.FAILED, S.PENDING, S.UNLOADED, S.LOADING}),
    S.STARTING: frozenset({S.READY, S.RESTARTING, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.UNHEALTHY, S.RESTARTING, S.STOPPING}),
    S.UNHEALTHY: frozenset({S.READY, S.RESTARTING, S.STOPPING}),
    S.RESTARTING: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED, S.UNLOADED}),   # UNLOADED: an on-demand model unloaded or asleep
    S.STOPPED: frozenset({S.STARTING, S.PENDING}),
    S.FAILED: frozenset({S.STARTING, S.PENDING, S.STOPPING, S.STOPPED, S.FAILED,  # FAILED again: a new reason
                         S.LOADING}),  # an operator's `load` leaves failed
    # A sleeping worker (UNLOADED with its process) is stopped through STOPPING.
    S.UNLOADED: frozenset({S.LOADING, S.STOPPING, S.STOPPED, S.FAILED}),
    S.LOADING: frozenset({S.READY, S.STOPPING}),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow (a bug in the supervisor)."""


def check_transition(old: WorkerState, new: WorkerState) -> None:
    """Raise unless the table allows old -> new."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} -> {new.value}")
