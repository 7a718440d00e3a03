"""pykata.Extensions: the agent's own service (protos/extensions.proto,
docs/extensions.md), on the same connection as the upstream API.

Thin handlers, as in service.py: each streaming call reads its opening
message, lets the policy decide on it (rules name these RPCs as any other),
and hands the stream to one domain object. Bad input is INVALID_ARGUMENT.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message

from .. import __version__
from ..api import extensions_pb2 as ext
from ..extensions import EXTENSIONS, SERVICE
from ..ttrpc import ServerContext, ServerStream, Service, StreamMethod, UnaryMethod
from ..ttrpc.frame import MAX_DATA_SIZE
from ..ttrpc.server import Limits
from . import tracing
from .channel import Channel
from .errors import InvalidArgument
from .extlimits import ExtensionLimits
from .partials import UPLOADS_DIR, PartialNotes
from .portforward import Connector, Forwards, connect_tcp, connect_unix, target_address
from .storage import DRIVERS
from .streamexec import StreamExecs
from .transfer import Transfers
from .watch import Watches

if TYPE_CHECKING:
    from .serving import AgentParts

#: The upstream Kata agent API this agent implements (docs/api.md).
UPSTREAM_API_VERSION = "kata-containers agent.proto @7c6ba40c"

In = TypeVar("In", bound=Message)


def _span_ids(**ids: str) -> None:
    """The stream's span carries the ids of its opening message, as a unary RPC's
    span carries its request's (interceptors.ID_FIELDS)."""
    span = tracing.current.get()
    if span is not None:
        for name, value in ids.items():
            if value:
                span.set_attribute(name, value)


class Extensions:
    """pykata.Extensions; method names are the RPC names."""

    def __init__(self, parts: AgentParts, server_limits: Limits, limits: ExtensionLimits) -> None:
        self.parts = parts
        self.server_limits = server_limits
        self.limits = limits
        self.forwards = Forwards(limits.max_forwards, limits.max_chunk_bytes)
        self.transfers = Transfers(
            limits.max_transfers,
            limits.max_chunk_bytes,
            PartialNotes(parts.sandbox.run_dir / UPLOADS_DIR),
        )
        self.execs = StreamExecs(limits.max_execs, limits.max_chunk_bytes)
        self.watches = Watches(
            limits.max_watches,
            limits.watch_queue_events,
            limits.watch_window_events,
            limits.max_watched_directories,
        )

    @contextlib.contextmanager
    def _root(self, location: ext.FileLocation) -> Iterator[tuple[int, str]]:
        """(an O_PATH fd, the path) of the root `location` is inside - a container's,
        or the shared directory (no container id) - the fd open while in use."""
        if location.container_id:
            container = self.parts.sandbox.container(location.container_id)
            fd, path = container.open_root(), str(container.rootfs)
        else:
            root = self.parts.files.root
            root.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd, path = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), str(root)
        try:
            yield fd, path
        finally:
            os.close(fd)

    async def GetCapabilities(
        self, req: ext.CapabilitiesRequest, ctx: ServerContext
    ) -> ext.Capabilities:
        limits = self.limits
        return ext.Capabilities(
            agent_version=__version__,
            upstream_api_version=UPSTREAM_API_VERSION,
            extensions=[ext.Extension(name=n, version=v) for n, v in EXTENSIONS.items()],
            limits=ext.ExtensionLimits(
                max_message_bytes=MAX_DATA_SIZE,
                max_calls_per_connection=self.server_limits.max_calls_per_connection,
                max_connections=self.server_limits.max_connections,
                window_bytes=limits.window_bytes,
                max_chunk_bytes=limits.max_chunk_bytes,
                max_forwards=limits.max_forwards,
                watch_queue_events=limits.watch_queue_events,
                watch_window_events=limits.watch_window_events,
                max_watches=limits.max_watches,
                max_watched_directories=limits.max_watched_directories,
                max_transfers=limits.max_transfers,
                max_execs=limits.max_execs,
            ),
            storage_drivers=list(DRIVERS),
            runtime=await self.parts.sandbox.runtime.version(),
        )

    @contextlib.asynccontextmanager
    async def _opened(
        self,
        stream: ServerStream,
        ctx: ServerContext,
        incoming: type[In],
        opening: str,
        container_of: Callable[[In], str],
        **flow: Callable[[In], int],
    ) -> AsyncIterator[tuple[Channel[In], In]]:
        """A streaming call's channel (`flow`: its ack_of and data_of) and its opening
        message, which must have `opening` set; its span names the container, and
        the policy has let it through. The channel is closed after the call."""
        channel = Channel(stream, incoming, self.limits.window_bytes, **flow)
        try:
            first = await channel.first(opening)
            _span_ids(container_id=container_of(first))
            self.parts.policy.check(ctx.method, first)
            yield channel, first
        finally:
            await channel.close()

    async def PortForward(self, stream: ServerStream, ctx: ServerContext) -> None:
        async with self._opened(
            stream,
            ctx,
            ext.ForwardMessage,
            "open",
            lambda m: m.open.unix_socket.container_id,
            ack_of=lambda m: m.ack,
            data_of=lambda m: len(m.data),
        ) as (channel, first):
            await self.forwards.run(channel, self._connector(first.open))

    def _connector(self, target: ext.ForwardTarget) -> Connector:
        if not target.HasField("unix_socket"):
            address = target_address(target)
            netns = self.parts.sandbox.network.netns_path
            return lambda: connect_tcp(netns, address)
        if target.host or target.port:
            raise InvalidArgument("a forward target is a host and port, or a unix socket: not both")
        location = target.unix_socket

        async def connect() -> socket.socket:
            with self._root(location) as (root_fd, _):
                return await connect_unix(root_fd, location.path)

        return connect

    async def Upload(self, stream: ServerStream, ctx: ServerContext) -> None:
        async with self._opened(
            stream,
            ctx,
            ext.UploadInput,
            "open",
            lambda m: m.open.file.container_id,
            data_of=lambda m: len(m.data),
        ) as (channel, first):
            with self._root(first.open.file) as root:
                await self.transfers.upload(channel, root, first.open)

    async def Download(self, stream: ServerStream, ctx: ServerContext) -> None:
        async with self._opened(
            stream,
            ctx,
            ext.DownloadInput,
            "open",
            lambda m: m.open.file.container_id,
            ack_of=lambda m: m.ack,
        ) as (channel, first):
            with self._root(first.open.file) as root:
                await self.transfers.download(channel, root, first.open)

    async def Exec(self, stream: ServerStream, ctx: ServerContext) -> None:
        async with self._opened(
            stream,
            ctx,
            ext.ExecInput,
            "start",
            lambda m: m.start.container_id,
            ack_of=lambda m: m.ack,
            data_of=lambda m: len(m.stdin),
        ) as (channel, first):
            start = first.start
            start.exec_id = start.exec_id or f"exec-{os.urandom(8).hex()}"
            _span_ids(exec_id=start.exec_id)
            container = self.parts.sandbox.container(start.container_id)
            await self.execs.run(channel, container, start)

    async def Watch(self, stream: ServerStream, ctx: ServerContext) -> None:
        # Its acks count events, in a window of its own (watch.py).
        async with self._opened(
            stream, ctx, ext.WatchInput, "open", lambda m: m.open.location.container_id
        ) as (channel, first):
            with self._root(first.open.location) as (root_fd, _):
                await self.watches.run(channel, root_fd, first.open)


def extensions_service(
    parts: AgentParts, server_limits: Limits, limits: ExtensionLimits | None = None
) -> Service:
    impl = Extensions(parts, server_limits, limits or ExtensionLimits())
    service = Service(SERVICE)
    service.methods["GetCapabilities"] = UnaryMethod(ext.CapabilitiesRequest, impl.GetCapabilities)
    for name in EXTENSIONS:
        if name != "GetCapabilities":
            handler = getattr(impl, name, None)
            if handler is not None:
                service.methods[name] = StreamMethod(handler)
    return service
