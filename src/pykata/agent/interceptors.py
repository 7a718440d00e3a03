"""The agent's ttRPC server interceptors, run around every RPC's handler.

cli.py chains them in this order, the first outermost:

rpc_spans  (tracing on) the RPC's span: kind SERVER, named after the method, a
           child of the caller's W3C traceparent from the ttRPC metadata, else of
           the agent's root span; the RPC's steps (tracing.step) are its children
policy     the agent policy decides; a call it denies fails PERMISSION_DENIED
           before its handler runs, and its span records the error
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from ..ttrpc import (
    ServerContext,
    ServerStream,
    UnaryHandler,
    UnaryResponse,
    UnaryServerInterceptor,
)
from ..ttrpc.server import StreamHandler, StreamServerInterceptor
from . import tracing
from .policy import Enforcer

if TYPE_CHECKING:  # the span machinery is loaded only when tracing is on
    from .. import otlp
    from ..spans import RemoteParent, SpanContext, Tracer

#: Request fields an RPC span carries as attributes.
ID_FIELDS = ("container_id", "exec_id", "sandbox_id")

#: Per request type: which of ID_FIELDS it has.
_id_fields: dict[type, tuple[str, ...]] = {}
#: Per (service, method): its span's rpc.* attributes, encoded.
_rpc_attributes: dict[tuple[str, str], bytes] = {}


def _ids(request: Any) -> tuple[str, ...]:
    fields = _id_fields.get(type(request))
    if fields is None:
        names = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
        fields = _id_fields[type(request)] = tuple(f for f in ID_FIELDS if f in names)
    return fields


def _parent(ctx: ServerContext, root: SpanContext) -> SpanContext | RemoteParent:
    """The caller's W3C traceparent, else the agent's root span."""
    from ..spans import RemoteParent

    traceparent = ctx.metadata.get("traceparent")
    if not traceparent:
        return root
    # Parsed by the export thread (or by a step that needs it), not on the call's path.
    state = ",".join(ctx.metadata.get("tracestate", ()))
    return RemoteParent(traceparent[0], state, root)


def _rpc_attributes_of(ctx: ServerContext) -> bytes:
    """The span's rpc.* attributes, encoded once per method."""
    method = (ctx.service, ctx.method)
    encoded = _rpc_attributes.get(method)
    if encoded is None:
        from .. import otlp

        encoded = _rpc_attributes[method] = otlp.encode_attributes(
            {"rpc.system": "ttrpc", "rpc.service": ctx.service, "rpc.method": ctx.method}
        )
    return encoded


def rpc_spans(tracer: Tracer, root: SpanContext) -> UnaryServerInterceptor:
    """Each call in its span, made by `tracer`; `root` is the parent when the caller sent none."""
    from .. import otlp
    from ..spans import Span

    max_length = tracer.limits.max_attribute_length

    async def traced(request: Message, ctx: ServerContext, handler: UnaryHandler) -> UnaryResponse:
        parent = _parent(ctx, root)
        rpc_attributes = _rpc_attributes_of(ctx)
        attributes: dict[str, otlp.AttributeValue] = {}
        for name in _ids(request):
            value = getattr(request, name)
            if value:
                attributes[name] = value if len(value) <= max_length else value[:max_length]
        span = Span(
            tracer, ctx.method, parent, otlp.SERVER, attributes, time.time_ns(), rpc_attributes
        )
        token = tracing.current.set(span)
        try:
            return await handler(request, ctx)
        except BaseException as exc:
            span.record_error(exc)
            raise
        finally:
            tracing.current.reset(token)
            span.end()

    return traced


def stream_spans(tracer: Tracer, root: SpanContext) -> StreamServerInterceptor:
    """Each streaming call (pykata.Extensions) in its span, as rpc_spans does for unary
    ones; the span lasts as long as the stream."""
    from .. import otlp
    from ..spans import Span

    async def traced(
        stream: ServerStream, ctx: ServerContext, handler: StreamHandler
    ) -> bytes | None:
        parent, rpc_attributes = _parent(ctx, root), _rpc_attributes_of(ctx)
        span = Span(tracer, ctx.method, parent, otlp.SERVER, {}, time.time_ns(), rpc_attributes)
        token = tracing.current.set(span)
        try:
            return await handler(stream, ctx)
        except BaseException as exc:
            span.record_error(exc)
            raise
        finally:
            tracing.current.reset(token)
            span.end()

    return traced


def policy(enforcer: Enforcer) -> UnaryServerInterceptor:
    """The policy in force (SetPolicy may replace it) decides each call."""

    async def checked(request: Message, ctx: ServerContext, handler: UnaryHandler) -> UnaryResponse:
        enforcer.check(ctx.method, request)
        return await handler(request, ctx)

    return checked
