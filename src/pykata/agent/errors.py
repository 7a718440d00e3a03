"""The agent's domain errors: a fixed set of kinds, each carrying its status code.

Handlers let these through; the ttRPC server answers with the code and the
message, which always names what was wrong and with which id.
"""

from __future__ import annotations

from ..ttrpc import Code, TtrpcError


class AgentError(TtrpcError):
    code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class NotFound(AgentError):
    """No container, process or sandbox with that id."""

    code = Code.NOT_FOUND


class AlreadyExists(AgentError):
    """An id that is already taken."""

    code = Code.ALREADY_EXISTS


class InvalidArgument(AgentError):
    """A request that can never succeed as written (names the field)."""

    code = Code.INVALID_ARGUMENT


class FailedPrecondition(AgentError):
    """Right request, wrong state (start twice, exec in a stopped container)."""

    code = Code.FAILED_PRECONDITION


class PermissionDenied(AgentError):
    """The agent policy does not allow this request (names the rule)."""

    code = Code.PERMISSION_DENIED


class Unsupported(AgentError):
    """A feature this agent does not provide (here, or yet)."""

    code = Code.UNIMPLEMENTED


class RuntimeFailure(AgentError):
    """The OCI runtime refused; the message is the runtime's own."""

    code = Code.INTERNAL


class EndOfStream(AgentError):
    """Reading past the end of a process's output."""

    code = Code.OUT_OF_RANGE
