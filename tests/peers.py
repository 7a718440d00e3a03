"""Outside parts the tests, benchmarks and demo share: the Go ttRPC peer, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class FakeVmm:
    """Stands in for Firecracker/Cloud Hypervisor's hybrid vsock socket.

    Accepts on the VMM socket, reads "CONNECT <port>\\n", answers "OK <n>\\n"
    if `port` is served, then splices the stream to the guest-side listener
    (here: our agent on a unix socket).
    """

    def __init__(self, path: Path, ports: dict[int, str], reply: str | None = None) -> None:
        self.path = path
        self.ports = ports
        self.reply = reply
        self.connects: list[str] = []

    async def __aenter__(self) -> FakeVmm:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode()
        self.connects.append(line)
        port = int(line.split()[1]) if line.startswith("CONNECT ") else -1
        if self.reply is not None or port not in self.ports:
            writer.write((self.reply or "").encode())
            await writer.drain()
            writer.close()
            return
        guest_reader, guest_writer = await asyncio.open_unix_connection(self.ports[port])
        writer.write(b"OK 1073741824\n")
        await asyncio.gather(self._pipe(reader, guest_writer), self._pipe(guest_reader, writer))

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        dst.close()


def go_client(socket_path: str, op: str, *args: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run the Go peer's client once; its JSON result lines."""
    result = subprocess.run(
        [
            str(build_go_peer()),
            "-desc",
            str(REFERENCE_DESCRIPTORS),
            "client",
            "-socket",
            socket_path,
            "-op",
            op,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@contextlib.contextmanager
def go_server(socket_path: str) -> Iterator[None]:
    """The Go peer serving grpc.Health (and a Sleep test method) on a unix socket."""
    proc = subprocess.Popen(
        [
            str(build_go_peer()),
            "-desc",
            str(REFERENCE_DESCRIPTORS),
            "server",
            "-socket",
            socket_path,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_socket(socket_path, proc=proc)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def processes_with(*words: str) -> list[str]:
    """Command lines (spaces for NULs) of running processes that hold every word."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(word in text for word in words):
            found.append(text)
    return found
