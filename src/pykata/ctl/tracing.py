"""kata-agent-ctl --trace: this tool's spans, and the traceparent its requests carry.

The run is one trace: a root span `kata-agent-ctl`, a span per command line,
and a client span per call, made by the client's interceptor (`intercept`),
whose context goes to the agent as the W3C `traceparent` (the agent's RPC
span is its child, the agent's runtime spans are the RPC's). The spans go to
kata-trace-forwarder like the agent's, as OTLP records; kata-trace-view then
shows the whole run as one tree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from .. import __version__, otlp
from ..spanexport import Exporter
from ..spans import Span, SpanContext, Tracer
from ..ttrpc import ClientContext, Code, Invoker, TtrpcError


class ClientTracing:
    def __init__(self, forwarder: str, agent_address: str) -> None:
        resource: dict[str, otlp.AttributeValue] = {
            "service.name": "kata-agent-ctl",
            "service.version": __version__,
            "process.pid": os.getpid(),
        }
        self.exporter = Exporter(forwarder, resource, "pykata.ctl", __version__)
        self.tracer = Tracer(self.exporter)
        self.root = self.tracer.start(
            "kata-agent-ctl", attributes={"server.address": agent_address}
        )
        #: The parent of the calls made now: the command line being run, else the run.
        self.parent: SpanContext = self.root.context

    @contextlib.contextmanager
    def command(self, name: str, line: str) -> Iterator[Span]:
        """The span of one command line; the calls it makes are its children."""
        span = self.tracer.start(name, self.parent, attributes={"command": line})
        outer, self.parent = self.parent, span.context
        try:
            yield span
        finally:
            self.parent = outer
            span.end()

    async def intercept(self, request: Any, ctx: ClientContext, invoke: Invoker) -> Any:
        """The client interceptor: a span for the call, whose traceparent the request carries."""
        span = self.tracer.start(
            f"{ctx.service}/{ctx.method}",
            self.parent,
            kind=otlp.CLIENT,
            attributes={
                "rpc.system": "ttrpc",
                "rpc.service": ctx.service,
                "rpc.method": ctx.method,
            },
        )
        ctx.metadata["traceparent"] = [span.context.traceparent()]
        try:
            response = await invoke(request, ctx)
        except TtrpcError as exc:
            span.set_attribute("rpc.grpc.status_code", int(exc.code))
            span.status = otlp.STATUS_ERROR
            span.status_message = f"{exc.code.name}: {exc.message}"
            span.end()
            raise
        except BaseException as exc:
            span.record_error(exc)
            span.end()
            raise
        span.set_attribute("rpc.grpc.status_code", int(Code.OK))
        span.end()
        return response

    def stop(self, *, failed: bool) -> None:
        """End the run's span and send every span: for up to 2 seconds, so that a
        forwarder that is not there delays the tool's exit little (the loss is logged)."""
        if failed:
            self.root.status, self.root.status_message = otlp.STATUS_ERROR, "a command failed"
        self.root.end()
        self.exporter.stop(2.0)
