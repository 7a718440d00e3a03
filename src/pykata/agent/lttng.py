"""The agent's log records as LTTng userspace events (LTTng's Python agent).

With KATA_AGENT_LTTNG=true the agent loads `lttngust` - Debian's
python3-lttngust, found on the system interpreter's path when our own
interpreter does not have it - and lets its records reach the root logger,
where lttngust listens. A session that enables `--python pykata` then
records every agent log line as an `lttng_python:event`.
"""

from __future__ import annotations

import logging

from .. import debian

log = logging.getLogger("pykata.agent.lttng")


def load_python_agent() -> bool:
    """Load LTTng's Python agent; False (and one log line) when it cannot be."""
    try:
        debian.import_module("lttngust")  # registers with the session daemon on import
    except ImportError as exc:
        log.warning("LTTng Python agent not loaded (%s): no LTTng events from the agent", exc)
        return False
    logging.getLogger("pykata").propagate = True  # lttngust's handler sits on the root logger
    log.info("LTTng Python agent loaded")
    return True
