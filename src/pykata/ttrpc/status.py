"""Status codes (the gRPC set) and the one error type that carries them."""

from __future__ import annotations

import enum

from google.rpc import status_pb2


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """Unknown numbers become UNKNOWN, as gRPC does."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(Exception):
    """A call ended with a non-OK status.

    Raised by clients for every failed call, and raised by handlers (or
    subclassed by domain errors) to choose the status the server answers.
    """

    code: Code = Code.UNKNOWN

    def __init__(self, code: Code | int | None = None, message: str = "") -> None:
        if code is not None:
            self.code = Code.from_wire(int(code))
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=int(self.code), message=self.message)

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> TtrpcError:
        return cls(Code.from_wire(status.code), status.message)
