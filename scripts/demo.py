"""`make demo`: the agent stand-alone, driven by our ttRPC client and by containerd's Go one.

Starts kata-agent on a unix socket, asks Health for its status and version,
shows an agent method that is not implemented yet, lets the Go ttRPC client
call it too, then stops the agent with SIGTERM and checks it cleaned up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import REFERENCE_DESCRIPTORS, build_go_peer, wait_for_socket  # noqa: E402

from pykata.api import health_pb2  # noqa: E402
from pykata.ttrpc import Client, TtrpcError  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def talk(address: str) -> None:
    async with await Client.connect(address) as client:
        check = await client.call(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )
        print("Health/Check  ->", health_pb2.HealthCheckResponse.ServingStatus.Name(check.status))
        version = await client.call(
            "grpc.Health", "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse
        )
        print(f"Health/Version -> agent {version.agent_version}, API {version.grpc_version}")
        try:
            await client.call_raw("grpc.AgentService", "GetGuestDetails", b"")
        except TtrpcError as exc:
            print(f"AgentService/GetGuestDetails -> {exc}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/kata-agent.sock"
        address = f"unix://{sock}"
        (Path(tmp) / "cmdline").write_text("agent.log=info")
        say(f"starting kata-agent on {address}")
        agent = subprocess.Popen(
            [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"],
            env={**os.environ, "KATA_AGENT_SERVER_ADDR": address},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_socket(sock, proc=agent)
            say("our ttRPC client")
            asyncio.run(talk(address))
            say("containerd's Go ttRPC client (Debian golang-github-containerd-ttrpc-dev)")
            peer = build_go_peer()
            for op in ("check", "version", "unknown"):
                subprocess.run(
                    [
                        str(peer),
                        "-desc",
                        str(REFERENCE_DESCRIPTORS),
                        "client",
                        "-socket",
                        sock,
                        "-op",
                        op,
                    ],
                    check=True,
                )
        finally:
            say("SIGTERM")
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(10)
        assert agent.stderr is not None
        say("the agent's log (JSON lines on stderr)")
        for line in agent.stderr.read().splitlines():
            record = json.loads(line)
            print(
                f"  {record['level']} {record['msg']}",
                {
                    k: record[k]
                    for k in record
                    if k not in ("msg", "level", "ts", "pid", "source", "name", "subsystem")
                }
                or "",
            )
        print(f"\nexit status {code}; socket removed: {not os.path.exists(sock)}")
        return 0 if code == 0 and not os.path.exists(sock) else 1


if __name__ == "__main__":
    sys.exit(main())
