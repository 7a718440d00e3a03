"""The span API of the agent's domain: `step(...)` spans one step of an RPC.

A step (a runtime invocation, a mount) is a child of the step it runs in,
else of the RPC's span (which the tracing interceptor makes `current`),
else of the agent's root span. While tracing is off - nothing activated -
`step` makes nothing. The spans leave the agent through the export
machinery in traceprovider.py; this module knows neither it nor ttRPC.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the span machinery is loaded only when tracing is on (traceprovider.py)
    from .. import otlp
    from ..spans import Span, SpanContext, Tracer

#: The span the code running now is part of: a step, or its RPC's span.
current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("pykata_span", default=None)


class _Active(NamedTuple):
    tracer: Tracer
    root: SpanContext


#: The agent's tracing while it is on (one per process).
_active: _Active | None = None


def activate(tracer: Tracer, root: SpanContext) -> None:
    """Tracing is on: steps are made by `tracer`, with `root` as the parent of last resort."""
    global _active
    _active = _Active(tracer, root)


def deactivate() -> None:
    global _active
    _active = None


def counters() -> tuple[int, int]:
    """(spans exported, spans dropped) so far; (0, 0) when tracing is off."""
    exporter = _active.tracer.exporter if _active is not None else None
    if exporter is None:
        return 0, 0
    return exporter.exported_spans, exporter.dropped_spans


@contextlib.contextmanager
def step(name: str, attributes: Mapping[str, otlp.AttributeValue]) -> Iterator[Span | None]:
    """A span for one step of an RPC (a runtime run, a mount): a child of the step
    it runs in, else of the RPC. Nothing when tracing is off."""
    active = _active
    if active is None:
        yield None
        return
    parent = current.get()
    span = active.tracer.start(
        name, parent.context if parent else active.root, attributes=attributes
    )
    token = current.set(span)
    try:
        yield span
    except BaseException as exc:
        span.record_error(exc)
        raise
    finally:
        current.reset(token)
        span.end()
