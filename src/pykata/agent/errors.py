"""The agent's domain errors: a fixed set of kinds, each carrying its status code.

The code is what the kind means; for the upstream API the service answers
the code upstream's agent answers instead (codes.py). The message always
names what was wrong and with which id.
"""

from __future__ import annotations

from ..ttrpc.status import Code, TtrpcError


class AgentError(TtrpcError):
    code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class NotFound(AgentError):
    """Nothing by that name (an interface, a volume, a device)."""

    code = Code.NOT_FOUND


class ContainerNotFound(NotFound):
    """No container with that id."""


class ProcessNotFound(NotFound):
    """No such exec in the container (or its status was already collected)."""


class AlreadyExists(AgentError):
    """An id that is already taken."""

    code = Code.ALREADY_EXISTS


class InvalidArgument(AgentError):
    """A request that can never succeed as written (names the field)."""

    code = Code.INVALID_ARGUMENT


class MissingField(InvalidArgument):
    """A required field of the request is absent (names it)."""


class InvalidId(InvalidArgument):
    """An id that could not be a file name (ids.py); always INVALID_ARGUMENT."""


class FailedPrecondition(AgentError):
    """Right request, wrong state (start twice, exec in a stopped container)."""

    code = Code.FAILED_PRECONDITION


class NoTerminal(FailedPrecondition):
    """A terminal operation on a process without one."""


class LimitExceeded(AgentError):
    """A bound of the agent's was reached (names it); the caller may retry later."""

    code = Code.RESOURCE_EXHAUSTED


class PermissionDenied(AgentError):
    """The agent policy does not allow this request (names the rule)."""

    code = Code.PERMISSION_DENIED


class Unsupported(AgentError):
    """A feature this agent does not provide (here, or yet)."""

    code = Code.UNIMPLEMENTED


class RuntimeFailure(AgentError):
    """The OCI runtime refused; the message is the runtime's own."""

    code = Code.INTERNAL


class Unavailable(AgentError):
    """Something the call reaches for (a forwarded port) refused or went away."""

    code = Code.UNAVAILABLE
