"""A container's lifecycle in one table: each action, the states it is allowed in,
and the state it leaves the container in (as h11 keeps its state machine).
"""

from __future__ import annotations

import enum

from .errors import FailedPrecondition


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Action(enum.Enum):
    START = "start"
    EXEC = "exec in"
    PAUSE = "pause"
    RESUME = "resume"
    UPDATE = "update"


C, R, P = State.CREATED, State.RUNNING, State.PAUSED

#: action -> (the states it is allowed in, the state after it; None: unchanged).
#: Resume goes back to the state before the pause (a created container can be paused).
TABLE: dict[Action, tuple[frozenset[State], State | None]] = {
    Action.START: (frozenset({C}), R),
    Action.EXEC: (frozenset({R}), None),
    Action.PAUSE: (frozenset({C, R}), P),
    Action.RESUME: (frozenset({P}), None),
    Action.UPDATE: (frozenset({C, R, P}), None),
}


class Lifecycle:
    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        self.state = State.CREATED
        self._before_pause = State.RUNNING

    def check(self, action: Action) -> None:
        """FailedPrecondition, naming the state, unless `action` is allowed now."""
        allowed, _ = TABLE[action]
        if self.state not in allowed:
            raise FailedPrecondition(
                f"cannot {action.value} container {self.container_id}: it is {self.state.value}"
            )

    def done(self, action: Action) -> None:
        """`action` succeeded: move on (unless the container stopped meanwhile)."""
        if self.state is State.STOPPED:
            return
        if action is Action.PAUSE:
            self._before_pause = self.state
        after = self._before_pause if action is Action.RESUME else TABLE[action][1]
        if after is not None:
            self.state = after

    def stopped(self) -> None:
        """The init process has exited."""
        self.state = State.STOPPED
