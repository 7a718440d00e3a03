"""Outside parts the tests, benchmarks and demo share: the Go ttRPC peer, readiness."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE_DESCRIPTORS = SHARED / "reference" / "kata-agent-api.binpb"
GO_PEER_SRC = ROOT / "tests" / "go" / "ttrpcpeer"
GO_PEER_BIN = ROOT / "tests" / "go" / "bin" / "ttrpcpeer"


def wait_for_socket(
    path: str, timeout: float = 10.0, proc: subprocess.Popen[str] | None = None
) -> None:
    """Readiness by retry: until something accepts connections on `path`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {path}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {path} after {timeout}s")
        time.sleep(0.02)


def build_go_peer() -> Path:
    sources = list(GO_PEER_SRC.glob("*.go"))
    if GO_PEER_BIN.exists() and all(
        GO_PEER_BIN.stat().st_mtime >= s.stat().st_mtime for s in sources
    ):
        return GO_PEER_BIN
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": "/usr/share/gocode",
        "GOCACHE": str(ROOT / "tests" / "go" / "bin" / ".cache"),
        "GOFLAGS": "",
    }
    GO_PEER_BIN.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["go", "build", "-o", str(GO_PEER_BIN), "."], cwd=GO_PEER_SRC, env=env, check=True
    )
    return GO_PEER_BIN
