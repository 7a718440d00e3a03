"""The QEMU monitor protocol: JSON lines on the VM's unix socket `qmp.sock`."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import VmError


class QmpSession:
    """One monitor connection for a run of commands: each new connection costs a
    greeting and the capabilities negotiation, which a restore cannot spare."""

    def __init__(self, path: Path, timeout: float = 5) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
            self._replies = self._sock.makefile("rb")
            self._replies.readline()  # the greeting
            self.call("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def call(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """The command's `return` value, or VmError with QEMU's words."""
        request = {"execute": command, **({"arguments": dict(arguments)} if arguments else {})}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:  # skip asynchronous events until the reply
            reply: dict[str, Any] = json.loads(self._replies.readline() or b"{}")
            if "event" not in reply:
                break
        if "error" in reply:
            raise VmError(f"QMP {command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        self._replies.close()
        self._sock.close()

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def qmp_socket_call(
    path: Path, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 5
) -> Any:
    """One QMP command on a new connection; its `return` value, or VmError with QEMU's words."""
    with QmpSession(path, timeout) as session:
        return session.call(command, arguments)
