"""What the agent serves: its parts, grpc.Health, and the list of services.

Health is made at start-up; grpc.AgentService (service.py) and
pykata.Extensions (extensions.py) are loaded on their first call
(ttrpc.LazyService): importing their handlers and the API's messages is
start-up time an agent need not spend before its first Check, and a runtime
that never calls Extensions never loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import __version__
from ..api import health_pb2
from ..extensions import SERVICE as EXTENSIONS
from ..ttrpc import ServerContext, Service
from ..ttrpc.server import LazyService, Limits

if TYPE_CHECKING:
    from .copyfile import SharedFiles
    from .diagnostics import Diagnostics
    from .extlimits import ExtensionLimits
    from .guest import Guest
    from .memagent import MemAgent
    from .metrics import Metrics
    from .policy import Enforcer
    from .sandbox import Sandbox
    from .volumes import Volumes

#: The agent API version reported by Health/Version (upstream's value).
API_VERSION = "0.0.1"
#: The service grpc.AgentService's handlers serve (service.py).
AGENT_SERVICE = "grpc.AgentService"


class Health:
    async def Check(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=API_VERSION, agent_version=__version__)


@dataclass
class AgentParts:
    """Everything the agent's RPCs act on."""

    sandbox: Sandbox
    guest: Guest
    files: SharedFiles
    volumes: Volumes
    memory: MemAgent
    policy: Enforcer
    diagnostics: Diagnostics
    #: Made on the first GetMetrics (prometheus_client takes ~20 ms to import).
    metrics: Metrics | None = None
    #: Called once DestroySandbox has answered (the agent as init stops there).
    after_sandbox_destroyed: Callable[[], None] | None = None


def health_service() -> Service:
    return Service.from_descriptor(health_pb2.DESCRIPTOR.services_by_name["Health"], Health())


def services(
    parts: AgentParts,
    limits: Limits | None = None,
    extension_limits: ExtensionLimits | None = None,
) -> list[Service | LazyService]:
    """The upstream services, and pykata.Extensions (extensions.py) next to them;
    all but Health loaded on their first call."""

    def load_agent_service() -> Service:
        from .service import agent_service

        return agent_service(parts)

    def load_extensions() -> Service:
        from .extensions import extensions_service

        return extensions_service(parts, limits or Limits(), extension_limits)

    return [
        health_service(),
        LazyService(AGENT_SERVICE, load_agent_service),
        LazyService(EXTENSIONS, load_extensions),
    ]
