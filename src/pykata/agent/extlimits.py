"""The bounds of pykata.Extensions (docs/extensions.md, "Limits"), each an
agent setting like the agent's other limits (config.py) and reported by
GetCapabilities."""

from __future__ import annotations

from dataclasses import dataclass

#: Events sent in one Watch message at most.
WATCH_BATCH = 64


@dataclass(frozen=True)
class ExtensionLimits:
    """Bounds of the extensions; docs/extensions.md lists them with these defaults."""

    #: Unacknowledged data bytes in flight per direction of a stream.
    window_bytes: int = 4 << 20
    #: Largest `data` in one message (at most a quarter of the window: see flow.py).
    max_chunk_bytes: int = 1 << 20
    max_forwards: int = 64
    max_transfers: int = 16
    max_execs: int = 64
    max_watches: int = 32
    watch_queue_events: int = 4096
    watch_window_events: int = 256
    max_watched_directories: int = 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_chunk_bytes * 4 > self.window_bytes:
            raise ValueError(
                f"max_chunk_bytes ({self.max_chunk_bytes}) must be at most a quarter of "
                f"window_bytes ({self.window_bytes})"
            )
        if self.watch_window_events < WATCH_BATCH * 4:
            raise ValueError(
                f"watch_window_events must be at least {WATCH_BATCH * 4}, "
                f"got {self.watch_window_events}"
            )


#: The settings' names (agent.NAME, NAME in the TOML file, KATA_AGENT_NAME).
EXTENSION_LIMITS = tuple(ExtensionLimits.__dataclass_fields__)
