"""`make demo`: the agent stand-alone, driven by our ttRPC client and by containerd's Go one.

Starts kata-agent on a unix socket, asks Health for its status and version,
creates a sandbox and a busybox container, streams its output, runs an exec,
collects the exit codes, removes everything, lets the Go ttRPC client call
the agent too, then stops the agent with SIGTERM and checks it cleaned up.
The agent's spans go through kata-trace-forwarder into a local trace file,
shown as a waterfall at the end.
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

from tests.containers import build_rootfs, spec  # noqa: E402
from tests.peers import REFERENCE_DESCRIPTORS, build_go_peer, wait_for_socket  # noqa: E402

from pykata.api import agent_pb2, health_pb2, oci_pb2  # noqa: E402
from pykata.ttrpc import Client, Stub, TtrpcError  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def stream(api: Stub, cid: str, exec_id: str = "") -> None:
    while True:
        reply = await api.ReadStdout(
            agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=4096)
        )
        if not reply.data:
            return  # the end of the stream
        for line in reply.data.decode().splitlines():
            print(f"  [{cid}{'/' + exec_id if exec_id else ''}] {line}")


async def containers(address: str, rootfs: Path) -> None:
    async with await Client.connect(address) as client:
        api = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
        await api.CreateSandbox(
            agent_pb2.CreateSandboxRequest(
                sandbox_id="demo", hostname="demo-sandbox", dns=["nameserver 192.0.2.1"]
            )
        )
        print("CreateSandbox demo (hostname demo-sandbox)")
        script = (
            "echo hello from $(hostname); uname -sr; for i in 1 2 3; do echo tick $i; "
            "sleep 0.2; done; exit 3"
        )
        await api.CreateContainer(
            agent_pb2.CreateContainerRequest(
                container_id="busybox", exec_id="busybox", OCI=spec(rootfs, "/bin/sh", "-c", script)
            )
        )
        await api.StartContainer(agent_pb2.StartContainerRequest(container_id="busybox"))
        print("CreateContainer + StartContainer busybox; its stdout:")
        await api.ExecProcess(
            agent_pb2.ExecProcessRequest(
                container_id="busybox",
                exec_id="ps",
                process=oci_pb2.Process(Args=["/bin/sh", "-c", "ps -o pid,args; exit 7"], Cwd="/"),
            )
        )
        await stream(api, "busybox")
        init = await api.WaitProcess(agent_pb2.WaitProcessRequest(container_id="busybox"))
        print(f"WaitProcess busybox -> exit code {init.status}")
        await stream(api, "busybox", "ps")
        ps = await api.WaitProcess(
            agent_pb2.WaitProcessRequest(container_id="busybox", exec_id="ps")
        )
        print(f"WaitProcess busybox/ps -> exit code {ps.status}")
        await api.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="busybox"))
        await api.DestroySandbox(agent_pb2.DestroySandboxRequest())
        print("RemoveContainer + DestroySandbox: done")


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
        rootfs = build_rootfs(Path(tmp) / "rootfs")
        spans = Path(tmp) / "spans.jsonl"
        say(f"starting kata-trace-forwarder on unix://{tmp}/trace.sock -> {spans}")
        forwarder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pykata.forwarder.cli",
                "--listen",
                f"unix://{tmp}/trace.sock",
                "--output",
                str(spans),
                "-l",
                "warn",
            ]
        )
        wait_for_socket(f"{tmp}/trace.sock", proc=forwarder)
        say(f"starting kata-agent on {address}")
        agent = subprocess.Popen(
            [sys.executable, "-m", "pykata.agent.cli", "--kernel-cmdline", f"{tmp}/cmdline"],
            env={
                **os.environ,
                "KATA_AGENT_SERVER_ADDR": address,
                "KATA_AGENT_RUN_DIR": f"{tmp}/run",
                "KATA_AGENT_TRACING": "true",
                "KATA_AGENT_TRACE_ADDR": f"unix://{tmp}/trace.sock",
            },
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_socket(sock, proc=agent)
            say("our ttRPC client")
            asyncio.run(talk(address))
            say("a sandbox and a busybox container")
            asyncio.run(containers(address, rootfs))
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
        forwarder.send_signal(signal.SIGTERM)
        forwarder.wait(15)
        say("the agent's spans (kata-trace-view)")
        subprocess.run([sys.executable, "-m", "pykata.traceview", str(spans)], check=True)
        left = list((Path(tmp) / "run" / "containers").glob("*"))
        print(
            f"\nexit status {code}; socket removed: {not os.path.exists(sock)}; "
            f"bundles left: {len(left)}"
        )
        return 0 if code == 0 and not os.path.exists(sock) and not left else 1


if __name__ == "__main__":
    sys.exit(main())
