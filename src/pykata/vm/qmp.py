"""The QEMU monitor protocol: JSON lines on the VM's unix socket `qmp.sock`."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import VmError


def qmp_socket_call(
    path: Path, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 5
) -> Any:
    """One QMP command on a new connection; its `return` value, or VmError with QEMU's words."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        replies = sock.makefile("rb")
        replies.readline()  # the greeting
        requests: list[dict[str, object]] = [
            {"execute": "qmp_capabilities"},
            {"execute": command, **({"arguments": dict(arguments)} if arguments else {})},
        ]
        reply: dict[str, Any] = {}
        for request in requests:
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:  # skip asynchronous events until the reply
                reply = json.loads(replies.readline() or b"{}")
                if "event" not in reply:
                    break
            if "error" in reply:
                raise VmError(f"QMP {request['execute']}: {reply['error'].get('desc')}")
        return reply.get("return")
