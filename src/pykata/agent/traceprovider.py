"""The agent's tracing for one run: its exporter to kata-trace-forwarder and its root span.

Made by the command line when tracing is on; it turns the span API
(tracing.py) on until `stop`. Spans go out as OTLP records (pykata.spanexport).
"""

from __future__ import annotations

import os

from .. import __version__, otlp
from ..spanexport import Exporter
from ..spans import Limits, Tracer
from . import tracing


class TraceProvider:
    """The exporter, the tracer and the root span `kata-agent` (ends at stop)."""

    def __init__(self, address: str, limits: Limits | None = None) -> None:
        resource: dict[str, otlp.AttributeValue] = {
            "service.name": "kata-agent",
            "service.version": __version__,
            "process.pid": os.getpid(),
        }
        self.exporter = Exporter(address, resource, "pykata.agent", __version__, limits)
        self.tracer = Tracer(self.exporter)
        self.root = self.tracer.start("kata-agent")
        self.root_context = self.root.context
        tracing.activate(self.tracer, self.root_context)

    def stop(self, timeout: float = 5.0) -> None:
        """End the root span and send everything, for up to `timeout` seconds."""
        self.root.end()
        tracing.deactivate()
        self.exporter.stop(timeout)
