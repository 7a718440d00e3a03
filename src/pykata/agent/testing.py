"""The agent's services in this process, wired to a client (as grpclib's ChannelFor).

For tests of the service and domain layers without spawning an agent: the
same parts, interceptors and ttRPC framing as `kata-agent`, over a socketpair.

    async with agent_for(tmp_path / "run") as agent:
        await agent.api.CreateContainer(...)

Containers need the calling process to be the child subreaper (their init
processes are reparented to it), so while the context is open this process is
one. The runtime is runc by default: crun on a host with hybrid cgroups needs a
private mount namespace, which a process with threads cannot enter.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..api import agent_pb2, health_pb2
from ..log import JsonFormatter
from ..ttrpc import Server, Stub
from ..ttrpc.client import UnaryClientInterceptor
from ..ttrpc.testing import connected
from . import config as configmod
from . import leftovers, reaper
from . import runtime as runtime_mod
from .cli import agent_parts, call_interceptors
from .diagnostics import RecentLogs
from .serving import AgentParts, services


@dataclass
class InProcessAgent:
    """Stubs for the agent's two services, and the parts they act on."""

    api: Stub
    health: Stub
    parts: AgentParts


@contextlib.asynccontextmanager
async def agent_for(
    run_dir: Path,
    *,
    runtime: str = "runc",
    policy_file: str = "",
    client_interceptors: Iterable[UnaryClientInterceptor] = (),
) -> AsyncIterator[InProcessAgent]:
    """The agent serving in this process with its run dir in `run_dir`; at the end its
    sandbox is destroyed, as a stopping agent does."""
    config = configmod.AgentConfig(run_dir=str(run_dir), policy_file=policy_file)
    oci = runtime_mod.OciRuntime(runtime_mod.choose(runtime), run_dir / "runtime")
    parts = agent_parts(config, oci, RecentLogs(JsonFormatter("kata-agent", "agent")))
    await leftovers.clean(run_dir, oci, parts.files)
    server = Server(services(parts), interceptors=call_interceptors(parts.policy, None))
    with _subreaper():
        try:
            async with connected(server, interceptors=client_interceptors) as client:
                yield InProcessAgent(
                    api=Stub(client, agent_pb2.DESCRIPTOR.services_by_name["AgentService"]),
                    health=Stub(client, health_pb2.DESCRIPTOR.services_by_name["Health"]),
                    parts=parts,
                )
        finally:
            await parts.sandbox.destroy()
            await server.shutdown(grace=1.0)
            await parts.memory.stop()


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    reaper.become_subreaper()
    try:
        yield
    finally:
        reaper.become_subreaper(on=False)
