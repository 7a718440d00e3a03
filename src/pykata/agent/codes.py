"""The status code upstream's agent answers for each failure, RPC by RPC.

The Kata runtime and its tools meet the agent through these codes, so
grpc.AgentService answers what upstream's Rust agent answers
(kata-containers src/agent/src/rpc.rs): INTERNAL unless a handler there
says otherwise. Messages stay ours. docs/api.md has the whole table with
the upstream source of every row; tests/test_upstream_codes.py provokes
each case on a real agent.

A few kinds are always answered with their own code: they are cases
upstream does not have (our id check and bounds) or has with the same
code (a policy denial).
"""

from __future__ import annotations

from ..ttrpc import Code
from .errors import (
    AgentError,
    ContainerNotFound,
    InvalidArgument,
    InvalidId,
    LimitExceeded,
    MissingField,
    NoTerminal,
    PermissionDenied,
    ProcessNotFound,
)

ALWAYS_OWN_CODE: tuple[type[AgentError], ...] = (InvalidId, LimitExceeded, PermissionDenied)

# The process-lookup RPCs map lookup errors through sandbox_err_to_ttrpc
# (rpc.rs:167-175): unknown container INVALID_ARGUMENT, unknown exec NOT_FOUND.
Codes = dict[type[AgentError], Code]
_PROCESS_LOOKUP: Codes = {ContainerNotFound: Code.INVALID_ARGUMENT, ProcessNotFound: Code.NOT_FOUND}
# Handlers that look the container up themselves and answer INVALID_ARGUMENT.
_CONTAINER_LOOKUP: Codes = {ContainerNotFound: Code.INVALID_ARGUMENT}
# Handlers that check a required field and answer INVALID_ARGUMENT.
_FIELD_CHECK: Codes = {MissingField: Code.INVALID_ARGUMENT}
# Handlers whose argument checks all answer INVALID_ARGUMENT.
_ARGUMENT_CHECK: Codes = {InvalidArgument: Code.INVALID_ARGUMENT}

BY_RPC: dict[str, Codes] = {
    "SignalProcess": _PROCESS_LOOKUP,  # rpc.rs:545-548
    "WaitProcess": _PROCESS_LOOKUP,  # rpc.rs:660-664
    "ReadStdout": _PROCESS_LOOKUP,  # rpc.rs:823-842
    "ReadStderr": _PROCESS_LOOKUP,
    "CloseStdin": _PROCESS_LOOKUP,  # rpc.rs:1157-1179
    "TtyWinResize": {**_PROCESS_LOOKUP, NoTerminal: Code.UNAVAILABLE},  # rpc.rs:1181-1210
    "UpdateContainer": _CONTAINER_LOOKUP,  # rpc.rs:1009-1027
    "StatsContainer": _CONTAINER_LOOKUP,  # rpc.rs:1029-1066
    "PauseContainer": _CONTAINER_LOOKUP,  # rpc.rs:1068-1082
    "ResumeContainer": _CONTAINER_LOOKUP,  # rpc.rs:1084-1098
    "UpdateInterface": _FIELD_CHECK,  # rpc.rs:1212-1300
    "UpdateRoutes": _FIELD_CHECK,  # rpc.rs:1302-1334
    "AddARPNeighbors": _FIELD_CHECK,  # rpc.rs:1614-1640
    "GetDiagnosticData": _ARGUMENT_CHECK,  # rpc.rs:1874-1892 (log_type)
    "SetPolicy": _ARGUMENT_CHECK,  # policy.rs:44-52
}


def upstream_code(rpc: str, error: AgentError) -> Code:
    """The code upstream's agent answers `rpc` failing this way."""
    if isinstance(error, ALWAYS_OWN_CODE):
        return error.code
    for kind, code in BY_RPC.get(rpc, {}).items():
        if isinstance(error, kind):
            return code
    return Code.INTERNAL
