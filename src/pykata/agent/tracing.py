"""The agent's spans, sent to kata-trace-forwarder as OTLP records (pykata.spans).

A root span covers the agent's run; each RPC's span is made by the tracing
interceptor (interceptors.rpc_spans), which makes it `current`; runtime
invocations and mounts are children of the RPC they run in (`step`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

from .. import __version__, otlp
from ..spanexport import Exporter
from ..spans import Limits, Span, Tracer

#: The span the code running now is part of: a step, or its RPC's span.
current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("pykata_span", default=None)
#: The agent's tracing while it is on (one per process).
_active: Tracing | None = None


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
    parent = current.get()
    span = tracing.tracer.start(
        name, parent.context if parent else tracing.root_context, attributes=attributes
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


class Tracing:
    """Tracing for one agent run: the exporter, the root span."""

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
        _active = self

    def stop(self, timeout: float = 5.0) -> None:
        """End the root span and send everything, for up to `timeout` seconds."""
        global _active
        self.root.end()
        _active = None
        self.exporter.stop(timeout)
