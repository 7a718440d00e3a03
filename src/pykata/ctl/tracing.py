"""kata-agent-ctl --trace: this tool's spans, and the traceparent its requests carry.

The run is one trace: a root span `kata-agent-ctl`, a span per command line,
and a client span per call whose context goes to the agent as the W3C
`traceparent` (the agent's RPC span is its child, the agent's runtime spans
are the RPC's). The spans go to kata-trace-forwarder like the agent's, as
OTLP records; kata-trace-view then shows the whole run as one tree.
"""

from __future__ import annotations

import os

from .. import __version__, otlp
from ..spanexport import Exporter
from ..spans import Tracer


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

    def stop(self, *, failed: bool) -> None:
        """End the run's span and send every span: for up to 2 seconds, so that a
        forwarder that is not there delays the tool's exit little (the loss is logged)."""
        if failed:
            self.root.status, self.root.status_message = otlp.STATUS_ERROR, "a command failed"
        self.root.end()
        self.exporter.stop(2.0)
