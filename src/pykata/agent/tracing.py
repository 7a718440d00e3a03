"""The agent's spans, sent to kata-trace-forwarder as OTLP records (pykata.spans).

A root span covers the agent's run; each RPC gets a span (kind SERVER) named
after its method, whose parent is the W3C `traceparent` the caller put in
the ttRPC metadata (else the root span); runtime invocations and mounts are
children of the RPC they run in (`step`). An unsampled traceparent (flags
00) records nothing, as OpenTelemetry's parent-based sampling does.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

from .. import __version__, otlp
from ..spanexport import Exporter
from ..spans import Limits, RemoteParent, Span, SpanContext, Tracer
from ..ttrpc import ServerContext

ID_FIELDS = ("container_id", "exec_id", "sandbox_id")

_current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("pykata_span", default=None)
#: The agent's tracing while it is on (one per process).
_active: Tracing | None = None
#: Per request type: which of ID_FIELDS it has.
_id_fields: dict[type, tuple[str, ...]] = {}
#: Per (service, method): its span's rpc.* attributes, encoded.
_rpc_attributes: dict[tuple[str, str], bytes] = {}


def counters() -> tuple[int, int]:
    """(spans exported, spans dropped) so far; (0, 0) when tracing is off."""
    if _active is None:
        return 0, 0
    exporter = _active.exporter
    return exporter.exported_spans, exporter.dropped_spans


@contextlib.contextmanager
def step(name: str, attributes: Mapping[str, otlp.AttributeValue]) -> Iterator[Span | None]:
    """A span for one step of an RPC (a runtime run, a mount): a child of the step
    it runs in, else of the RPC. Nothing when tracing is off."""
    tracing = _active
    if tracing is None:
        yield None
        return
    parent = _current.get()
    span = tracing.tracer.start(
        name, parent.context if parent else tracing.root_context, attributes=attributes
    )
    token = _current.set(span)
    try:
        yield span
    except BaseException as exc:
        span.record_error(exc)
        raise
    finally:
        _current.reset(token)
        span.end()


def _ids(request: Any) -> tuple[str, ...]:
    fields = _id_fields.get(type(request))
    if fields is None:
        names = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
        fields = _id_fields[type(request)] = tuple(f for f in ID_FIELDS if f in names)
    return fields


class RpcSpan:
    """The span of one RPC (a context manager around its handler)."""

    __slots__ = ("_ctx", "_request", "_span", "_token", "_tracing")

    def __init__(self, tracing: Tracing, ctx: ServerContext, request: Any) -> None:
        self._tracing = tracing
        self._ctx = ctx
        self._request = request

    def __enter__(self) -> Span:
        ctx, tracing = self._ctx, self._tracing
        metadata = ctx.metadata
        traceparent = metadata.get("traceparent")
        parent: SpanContext | RemoteParent = tracing.root_context
        if traceparent:  # parsed by the export thread (or by a step that needs it)
            state = ",".join(metadata.get("tracestate", ()))
            parent = RemoteParent(traceparent[0], state, tracing.root_context)
        method = (ctx.service, ctx.method)
        rpc_attributes = _rpc_attributes.get(method)
        if rpc_attributes is None:
            rpc_attributes = _rpc_attributes[method] = otlp.encode_attributes(
                {"rpc.system": "ttrpc", "rpc.service": ctx.service, "rpc.method": ctx.method}
            )
        attributes: dict[str, otlp.AttributeValue] = {}
        request = self._request
        for name in _ids(request):
            value = getattr(request, name)
            if value:
                attributes[name] = (
                    value if len(value) <= tracing.max_length else value[: tracing.max_length]
                )
        span = self._span = Span(
            tracing.tracer,
            ctx.method,
            parent,
            otlp.SERVER,
            attributes,
            time.time_ns(),
            rpc_attributes,
        )
        self._token = _current.set(span)
        return span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _current.reset(self._token)
        if exc is not None:
            self._span.record_error(exc)
        self._span.end()


class Tracing:
    """Tracing for one agent run: the exporter, the root span, the RPC hook."""

    def __init__(self, address: str, limits: Limits | None = None) -> None:
        global _active
        resource: dict[str, otlp.AttributeValue] = {
            "service.name": "kata-agent",
            "service.version": __version__,
            "process.pid": os.getpid(),
        }
        self.exporter = Exporter(address, resource, "pykata.agent", __version__, limits)
        self.tracer = Tracer(self.exporter)
        self.root = self.tracer.start("kata-agent")
        self.root_context = self.root.context
        self.max_length = self.exporter.limits.max_attribute_length
        _active = self

    def rpc_span(self, ctx: ServerContext, request: Any) -> RpcSpan:
        return RpcSpan(self, ctx, request)

    def stop(self, timeout: float = 5.0) -> None:
        """End the root span and send everything, for up to `timeout` seconds."""
        global _active
        self.root.end()
        _active = None
        self.exporter.stop(timeout)
