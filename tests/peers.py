"""Outside parts the tests, benchmarks and demo share: the Go ttRPC peer, the Go
replay of the Kata runtime, the fake VMM, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE_DESCRIPTORS = SHARED / "reference" / "kata-agent-api.binpb"
GO_BIN = ROOT / "tests" / "go" / "bin"  # build output, never committed
GO_PEER_SRC = ROOT / "tests" / "go" / "ttrpcpeer"
GO_PEER_BIN = GO_BIN / "ttrpcpeer"
RUNTIME_SRC = ROOT / "tests" / "go" / "kataruntime"
RUNTIME_BIN = GO_BIN / "kataruntime"
#: GOPATH of the Go code generated from protos/ at test time.
GENERATED_GOPATH = GO_BIN / "gopath"
#: Go import path of the generated packages, and which proto file goes to which.
GO_PROTOCOLS = "pykata.test/protocols"
GO_PACKAGES = {
    "agent.proto": "grpc",
    "oci.proto": "grpc",
    "csi.proto": "grpc",
    "health.proto": "grpc",
    "types.proto": "types",
    "google/protobuf/empty.proto": "empty",
}


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


def _up_to_date(binary: Path, inputs: list[Path]) -> bool:
    return binary.exists() and all(binary.stat().st_mtime >= i.stat().st_mtime for i in inputs)


def _go_build(src: Path, binary: Path, gopath: str = "/usr/share/gocode") -> Path:
    """Offline, from Debian's Go packages (GOPATH mode)."""
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": gopath,
        "GOCACHE": str(GO_BIN / ".cache"),
        "GOFLAGS": "",
    }
    binary.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=src, env=env, check=True)
    return binary


def build_go_peer() -> Path:
    if _up_to_date(GO_PEER_BIN, list(GO_PEER_SRC.glob("*.go"))):
        return GO_PEER_BIN
    return _go_build(GO_PEER_SRC, GO_PEER_BIN)


def build_runtime_client() -> Path:
    """tests/go/kataruntime over Go code generated from our protos (never committed)."""
    inputs = [*RUNTIME_SRC.glob("*.go"), *(ROOT / "protos").glob("*.proto"), Path(__file__)]
    if _up_to_date(RUNTIME_BIN, inputs):
        return RUNTIME_BIN
    generate_go_protocols(GENERATED_GOPATH / "src")
    return _go_build(RUNTIME_SRC, RUNTIME_BIN, f"{GENERATED_GOPATH}:/usr/share/gocode")


def generate_go_protocols(out: Path) -> None:
    """The Kata runtime's agent client, made the runtime's way from our protos.

    Messages by protoc-gen-go (1.28.1, the version upstream's runtime is built
    with); the AgentService and Health clients by protoc-gen-go-ttrpc (Debian's
    gogottrpc package, ttRPC 1.1.1). Two adaptations to that older ttRPC: its
    generator predates proto3 `optional`, so it reads a copy of the protos
    without the label (it uses only the service definitions); and its codec is
    gogo/protobuf's, which cannot encode protoc-gen-go messages with oneofs nor
    decode google.protobuf.Empty, so every generated message (Empty included,
    generated here too) gets Marshal/Unmarshal methods, which that codec prefers,
    calling the standard protobuf runtime.
    """
    shutil.rmtree(out / GO_PROTOCOLS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    protos = ROOT / "protos"
    ours = [name for name in GO_PACKAGES if not name.startswith("google/")]
    mapping = ",".join(f"M{name}={GO_PROTOCOLS}/{pkg}" for name, pkg in GO_PACKAGES.items())
    include = ["-I/usr/include"]  # google/protobuf/empty.proto (libprotobuf-dev)
    subprocess.run(
        ["protoc", f"-I{protos}", *include, f"--go_out={out}", f"--go_opt={mapping}",
         *GO_PACKAGES],
        check=True,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as plain:
        for name in ours:
            text = (protos / name).read_text()
            (Path(plain) / name).write_text(re.sub(r"^(\s*)optional ", r"\1", text, flags=re.M))
        subprocess.run(
            ["protoc", f"-I{plain}", *include, f"--go-ttrpc_out={out}",
             f"--go-ttrpc_opt={mapping}", "agent.proto", "health.proto"],
            check=True,
        )  # fmt: skip
    for package in sorted(set(GO_PACKAGES.values())):
        _write_gogo_codec(out / GO_PROTOCOLS / package)


_CODEC = (
    "func (x *{0}) Marshal() ([]byte, error) {{ return proto.Marshal(x) }}\n"
    "func (x *{0}) Unmarshal(b []byte) error {{ return proto.Unmarshal(b, x) }}"
)
_MESSAGE = re.compile(r"^type (\w+) struct \{\n\tstate +protoimpl\.MessageState", re.M)


def _write_gogo_codec(package: Path) -> None:
    names: list[str] = []
    go_package = ""
    for source in sorted(package.glob("*.pb.go")):
        text = source.read_text()
        go_package = re.search(r"^package (\w+)", text, re.M).group(1)  # type: ignore[union-attr]
        names += _MESSAGE.findall(text)
    assert names, f"no messages found in {package}"
    lines = [
        "// Code generated by tests/peers.py for ttRPC 1.1.1's gogo codec. DO NOT EDIT.",
        f"package {go_package}",
        'import "google.golang.org/protobuf/proto"',
    ]
    lines += [_CODEC.format(name) for name in names]
    (package / "ttrpc_codec.go").write_text("\n".join(lines) + "\n")


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


def go_client(
    socket_path: str,
    op: str,
    *args: str,
    timeout: float = 300,
    descriptors: Path = REFERENCE_DESCRIPTORS,
) -> list[dict[str, Any]]:
    """Run the Go peer's client once; its JSON result lines. `descriptors`: the
    FileDescriptorSet it knows the messages from (the upstream API by default)."""
    result = subprocess.run(
        [
            str(build_go_peer()),
            "-desc",
            str(descriptors),
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
