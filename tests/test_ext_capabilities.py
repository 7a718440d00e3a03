"""GetCapabilities, kata-agent-ctl's refusal of what an agent lacks, the policy
and the flow-control bound on the extensions, and a Go ttRPC client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata import __version__
from pykata.agent.extensions import UPSTREAM_API_VERSION
from pykata.agent.extlimits import ExtensionLimits
from pykata.agent.storage import DRIVERS
from pykata.api import agent_pb2, health_pb2
from pykata.api import extensions_pb2 as ext
from pykata.extensions import EXTENSIONS, SERVICE
from pykata.extensions.client import Extensions, MissingExtension
from pykata.ttrpc import Client, Code, Server, Service, Stub, TtrpcError, UnaryMethod
from pykata.ttrpc.frame import MAX_DATA_SIZE

from .conftest import AgentProcess
from .extensions import eventually, init_pid, open_fds, start_container
from .peers import ROOT, go_client

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
CTL = [sys.executable, "-m", "pykata.ctl.cli"]


async def test_capabilities_say_what_the_agent_is(container_agent: AgentProcess) -> None:
    async with await Client.connect(container_agent.address) as client:
        caps = await Extensions(client).capabilities()
    assert caps.agent_version == __version__
    assert caps.upstream_api_version == UPSTREAM_API_VERSION
    assert {e.name: e.version for e in caps.extensions} == EXTENSIONS
    defaults = ExtensionLimits()
    assert caps.limits.max_message_bytes == MAX_DATA_SIZE
    assert caps.limits.window_bytes == defaults.window_bytes
    assert caps.limits.max_chunk_bytes == defaults.max_chunk_bytes
    assert caps.limits.max_forwards == defaults.max_forwards
    assert caps.limits.max_calls_per_connection == 1024
    assert list(caps.storage_drivers) == list(DRIVERS)
    assert caps.runtime.split()[0] in ("crun", "runc"), caps.runtime


def test_ctl_capabilities_prints_json(container_agent: AgentProcess) -> None:
    out = subprocess.run(
        [*CTL, "capabilities", container_agent.address], capture_output=True, text=True, check=True
    ).stdout
    caps = json.loads(out)
    assert caps["agent_version"] == __version__
    assert {e["name"] for e in caps["extensions"]} == set(EXTENSIONS)


@pytest.fixture
async def older_agent(tmp_path: Path) -> AsyncIterator[str]:
    """A real ttRPC server standing for agents without (some) extensions: an
    upstream-like one with only grpc.Health, and a pykata whose capabilities
    list GetCapabilities alone. Yields the second's address; the first's is
    the same path with '-upstream'."""

    async def check(req: health_pb2.CheckRequest, ctx: object) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=1)

    async def capabilities(req: ext.CapabilitiesRequest, ctx: object) -> ext.Capabilities:
        return ext.Capabilities(
            agent_version="0.1", extensions=[ext.Extension(name="GetCapabilities", version=1)]
        )

    health = Service("grpc.Health", {"Check": UnaryMethod(health_pb2.CheckRequest, check)})
    extensions = Service(
        SERVICE, {"GetCapabilities": UnaryMethod(ext.CapabilitiesRequest, capabilities)}
    )
    upstream = Server([health])
    older = Server([health, extensions])
    await upstream.start(f"unix://{tmp_path}/agent-upstream.sock")
    await older.start(f"unix://{tmp_path}/agent.sock")
    try:
        yield f"unix://{tmp_path}/agent.sock"
    finally:
        await older.shutdown(grace=1)
        await upstream.shutdown(grace=1)


async def _ctl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_ctl_refuses_what_the_agent_lacks_in_one_line(older_agent: str) -> None:
    status, out, err = await _ctl("port-forward", older_agent, "0:8080")
    assert status == 1 and out == ""
    assert err.count("\n") == 1, err
    assert "does not offer PortForward" in err and "GetCapabilities" in err
    upstream = older_agent.replace("agent.sock", "agent-upstream.sock")
    status, out, err = await _ctl("port-forward", upstream, "0:8080")
    assert status == 1 and err.count("\n") == 1, err
    assert f"has no {SERVICE} service" in err
    async with await Client.connect(upstream) as client:
        with pytest.raises(MissingExtension):
            await Extensions(client).require("Exec")


async def test_ctl_port_forward_serves_http(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    www = rootfs / "tmp" / f"ctl-www-{os.getpid()}"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("through kata-agent-ctl\n")
    async with await Client.connect(container_agent.address) as client:
        api = Stub(client, AGENT)
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"ctl-{os.getpid()}"))
        inside = "/" + str(www.relative_to(rootfs))
        await start_container(api, rootfs, "web", "/usr/sbin/httpd", "-f", "-p", "80", "-h", inside)
        pid = init_pid(tmp_path / "run", "web")
        await eventually(
            lambda: (
                ":0050 00000000:0000 0A" in Path(f"/proc/{pid}/net/tcp").read_text()
                or ":0050 00000000000000000000000000000000:0000 0A"
                in Path(f"/proc/{pid}/net/tcp6").read_text()
            )
        )
        proc = await asyncio.create_subprocess_exec(
            *CTL,
            "port-forward",
            container_agent.address,
            "0:80",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await proc.stdout.readline()).decode()
            assert line.startswith("forwarding 127.0.0.1:") and "-> 127.0.0.1:80" in line, line
            port = int(line.split()[1].rsplit(":", 1)[1])
            url = f"http://127.0.0.1:{port}/index.html"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read())
            assert body == b"through kata-agent-ctl\n"
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = await proc.communicate()
            for f in www.iterdir():
                f.unlink()
            www.rmdir()
        assert proc.returncode == 0, err


async def test_policy_names_extensions(container_agent: AgentProcess) -> None:
    policy = (
        'default = "allow"\n'
        '[[rules]]\nname = "no forwards but to 8080"\nmethods = ["PortForward"]\n'
        'decision = "deny"\nunless = { "open.port" = ["8080"] }\n'
    )
    async with await Client.connect(container_agent.address) as client:
        api = Stub(client, AGENT)
        await api.SetPolicy(agent_pb2.SetPolicyRequest(policy=policy))
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"pol-{os.getpid()}"))
        channel = await Extensions(client).open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=22)))
        with pytest.raises(TtrpcError) as denied:
            await channel.finish()
        assert denied.value.code == Code.PERMISSION_DENIED
        assert "no forwards but to 8080" in denied.value.message
        channel = await Extensions(client).open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=8080)))
        with pytest.raises(TtrpcError) as allowed:
            await channel.finish()
        assert allowed.value.code == Code.UNAVAILABLE  # allowed: nothing listens there


async def test_a_client_ignoring_the_window_is_cut_off(
    container_agent: AgentProcess, rootfs: Path, tmp_path: Path
) -> None:
    """A target that never reads, and a client that sends without waiting for acks:
    the agent holds no more than its bounds, fails that call RESOURCE_EXHAUSTED,
    and keeps serving."""
    async with await Client.connect(container_agent.address) as client:
        api = Stub(client, AGENT)
        await api.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id=f"flood-{os.getpid()}"))
        await start_container(
            api, rootfs, "sink", "/usr/bin/nc", "-l", "-p", "9100", "-e", "/bin/sleep", "1000"
        )
        pid = init_pid(tmp_path / "run", "sink")
        await eventually(
            lambda: (
                ":238C 00000000:0000 0A" in Path(f"/proc/{pid}/net/tcp").read_text()
                or ":238C 00000000000000000000000000000000:0000 0A"
                in Path(f"/proc/{pid}/net/tcp6").read_text()
            )
        )
        agent_pid = container_agent.proc.pid
        extensions = Extensions(client)
        await extensions.capabilities()
        baseline = open_fds(agent_pid)
        channel = await extensions.open("PortForward", ext.ForwardMessage)
        channel.send(ext.ForwardMessage(open=ext.ForwardTarget(port=9100)))
        first = await channel.recv()
        assert first is not None and first.opened
        chunk = os.urandom(1 << 20)
        for _ in range(64):  # 64 MiB, never waiting
            if channel.stream.finished:
                break
            channel.send(ext.ForwardMessage(data=chunk))
            await asyncio.sleep(0)
        with pytest.raises(TtrpcError) as cut:
            await channel.finish()
        assert cut.value.code == Code.RESOURCE_EXHAUSTED, cut.value
        await eventually(lambda: open_fds(agent_pid) == baseline)
        caps = await client.call(
            SERVICE, "GetCapabilities", ext.CapabilitiesRequest(), ext.Capabilities
        )
        assert caps.agent_version == __version__


def _descriptor_set(tmp_path: Path) -> Path:
    out = tmp_path / "extensions.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            "extensions.proto",
        ],
        check=True,
    )
    return out


def test_go_ttrpc_client(container_agent: AgentProcess, tmp_path: Path) -> None:
    """containerd's Go ttrpc (the Debian package, 1.1.1) calls GetCapabilities. It has
    no streams (they came in 1.2.0: a data frame is "unknown message type" to it),
    so of the streaming calls it gets what a unary caller can: the status of one
    that fails on its opening message."""
    desc = _descriptor_set(tmp_path)
    assert container_agent.socket_path is not None
    [caps] = go_client(
        container_agent.socket_path,
        "call",
        "-service",
        SERVICE,
        "-method",
        "GetCapabilities",
        descriptors=desc,
    )
    assert caps["status"]["code"] == 0, caps
    assert caps["response"]["agentVersion"] == __version__
    assert {e["name"] for e in caps["response"]["extensions"]} == set(EXTENSIONS)
    [bad] = go_client(
        container_agent.socket_path,
        "call",
        "-service",
        SERVICE,
        "-method",
        "PortForward",
        "-request",
        '{"open": {"host": "example.com", "port": 80}}',
        descriptors=desc,
    )
    assert bad["status"]["code"] == Code.INVALID_ARGUMENT, bad
    assert "not an IP address" in bad["status"]["message"]


async def test_streams_are_traced(tmp_path: Path, rootfs: Path) -> None:
    """A streaming call is one SERVER span, a child of the caller's traceparent, and
    the agent's steps in it (the runtime's exec) are its children."""
    from pykata.extensions.streamexec import ExecSession

    from .conftest import run_container_agent
    from .containers import process
    from .receivers import forwarder
    from .test_tracing import PARENT_SPAN, TRACE_ID, TRACEPARENT, read_file_spans

    out = tmp_path / "spans.jsonl"
    with forwarder(f"unix://{tmp_path}/fwd.sock", "--output", str(out)):
        env = {"KATA_AGENT_TRACING": "true", "KATA_AGENT_TRACE_ADDR": f"unix://{tmp_path}/fwd.sock"}
        with run_container_agent(tmp_path, env=env) as agent:
            async with await Client.connect(agent.address) as client:
                await start_container(Stub(client, AGENT), rootfs, "tr", "/bin/sleep", "100")
                session = await ExecSession.start(
                    Extensions(client),
                    "tr",
                    process("/bin/echo", "hi"),
                    metadata={"traceparent": TRACEPARENT},
                )
                async for _ in session.output():
                    pass
                assert session.exit_status == 0
            assert agent.stop() == 0
    spans = read_file_spans(out)
    (exec_span,) = [s for s in spans if s["name"] == "Exec"]
    assert exec_span["trace"] == TRACE_ID and exec_span["parent"] == PARENT_SPAN
    assert exec_span["kind"] == 2 and exec_span["error"] is None
    # Like a unary RPC's span (ExecProcess), it names the container and the exec.
    assert exec_span["attrs"]["container_id"] == "tr"
    assert exec_span["attrs"]["exec_id"] == session.exec_id
    assert any(s["name"] == "runtime exec" and s["parent"] == exec_span["id"] for s in spans)
    (caps,) = [s for s in spans if s["name"] == "GetCapabilities"]
    assert caps["kind"] == 2


async def test_configured_extension_limits_are_reported_and_hold(
    tmp_path: Path, rootfs: Path
) -> None:
    """The limits come from the agent's configuration: GetCapabilities reports them
    and the agent holds them."""
    from pykata.extensions.watch import watch

    from .conftest import run_container_agent

    env = {
        "KATA_AGENT_MAX_WATCHES": "1",
        "KATA_AGENT_WINDOW_BYTES": str(1 << 20),
        "KATA_AGENT_MAX_CHUNK_BYTES": str(128 << 10),
    }
    with run_container_agent(tmp_path, env=env) as agent:
        async with await Client.connect(agent.address) as client:
            extensions = Extensions(client)
            limits = (await extensions.capabilities()).limits
            assert (limits.max_watches, limits.window_bytes, limits.max_chunk_bytes) == (
                1,
                1 << 20,
                128 << 10,
            )
            assert limits.max_execs == ExtensionLimits().max_execs
            await start_container(Stub(client, AGENT), rootfs, "lim", "/bin/sleep", "100")
            where = ext.FileLocation(container_id="lim", path="/")
            first = watch(extensions, where)
            assert await first.__anext__() == ([], 0)
            second = watch(extensions, where)
            with pytest.raises(TtrpcError) as failed:
                await second.__anext__()
            assert failed.value.code == Code.RESOURCE_EXHAUSTED
            assert "limit 1" in failed.value.message
            await first.aclose()
