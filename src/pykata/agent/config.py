"""Agent configuration, read the upstream way.

Sources, lowest precedence first:

1. built-in defaults;
2. the kernel command line (`/proc/cmdline`): `agent.*` options - or, when it
   names `agent.config_file=PATH` (or the agent is started with
   `--config PATH`), that TOML file *instead of* the other options;
3. environment variables `KATA_AGENT_SERVER_ADDR`, `KATA_AGENT_LOG_LEVEL`,
   `KATA_AGENT_TRACING` (development and testing aids).

Bad values are treated as upstream treats them: a value that cannot be
parsed (log level, timeout, port, pipe size) stops the agent with an error
naming the option; a timeout or port that parses but is not positive is
ignored (the default stays); a boolean that is neither true/false nor a
number counts as false.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..log import DEFAULT_QUEUE_BYTES, TRACE
from ..ttrpc.server import Limits
from .extlimits import EXTENSION_LIMITS, ExtensionLimits

DEFAULT_SERVER_ADDR = "vsock://-1:1024"

SERVER_ADDR_ENV = "KATA_AGENT_SERVER_ADDR"
LOG_LEVEL_ENV = "KATA_AGENT_LOG_LEVEL"
TRACING_ENV = "KATA_AGENT_TRACING"
RUN_DIR_ENV = "KATA_AGENT_RUN_DIR"
TRACE_ADDR_ENV = "KATA_AGENT_TRACE_ADDR"
DEFAULT_TRACE_ADDR = "vsock://2:10240"
#: After an answer, poll this long for the next request before sleeping (docs/agent.md).
DEFAULT_BUSY_POLL_US = 0
MAX_BUSY_POLL_US = 10_000
OCI_RUNTIME_ENV = "KATA_AGENT_OCI_RUNTIME"
OWNS_MACHINE_ENV = "KATA_AGENT_OWNS_MACHINE"
POLICY_FILE_ENV = "KATA_AGENT_POLICY_FILE"
DEBUG_CONSOLE_ADDR_ENV = "KATA_AGENT_DEBUG_CONSOLE_ADDR"
LOG_ADDR_ENV = "KATA_AGENT_LOG_ADDR"

#: Accepted level names (logrus and slog spellings) -> Python logging level.
LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}


class ConfigError(ValueError):
    """A configuration value the agent cannot start with."""


@dataclass
class AgentConfig:
    debug_console: bool = False
    dev_mode: bool = False
    log_level: str = "info"
    hotplug_timeout: int = 3
    debug_console_vport: int = 0
    log_vport: int = 0
    container_pipe_size: int = 0
    server_addr: str = DEFAULT_SERVER_ADDR
    unified_cgroup_hierarchy: bool = False
    tracing: bool = False
    #: Where the trace forwarder listens (the host, as upstream, unless told otherwise).
    trace_addr: str = DEFAULT_TRACE_ADDR
    #: Where bundles, runtime state and sandbox files live (pykata setting).
    run_dir: str = "/run/kata-containers"
    #: "auto" (crun where it works, else runc), or a runtime name or path (pykata setting).
    oci_runtime: str = "auto"
    #: Act on the whole machine (clock, onlining, swap): implied when running as PID 1.
    owns_machine: bool = False
    #: The initial agent policy (TOML, docs/policy.md); "" allows everything.
    policy_file: str = ""
    #: Debug console address for stand-alone runs (else vsock://-1:<debug_console_vport>).
    debug_console_addr: str = ""
    #: Log port address for stand-alone runs (else vsock://-1:<log_vport>).
    log_addr: str = ""
    #: A virtio-serial port to park on before serving, for a snapshot (pykata extension:
    #: agent/restore.py); "" serves at once.
    restore_addr: str = ""
    # Limits (docs/agent.md, "Limits"): what clients can make the agent hold.
    max_connections: int = Limits.max_connections
    #: File descriptors kept free of connections, for containers, execs and the runtime.
    reserved_fds: int = 512
    max_calls_per_connection: int = Limits.max_calls_per_connection
    guaranteed_calls: int = Limits.guaranteed_calls
    max_calls: int = Limits.max_calls
    reply_high_water: int = Limits.reply_high_water
    max_queued_replies: int = Limits.max_queued_replies
    guaranteed_frame_bytes: int = Limits.guaranteed_frame_bytes
    max_frame_bytes: int = Limits.max_frame_bytes
    frame_timeout: float = Limits.frame_timeout
    peer_log_rate: float = Limits.peer_log_rate
    peer_log_burst: int = Limits.peer_log_burst
    log_queue_bytes: int = DEFAULT_QUEUE_BYTES
    log_port_readers: int = 8
    #: Microseconds the event loop keeps polling after an answer, waiting for the
    #: next request without sleeping (ttrpc.busypoll); 0: never.
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    # pykata.Extensions' limits (docs/extensions.md, "Limits"; extlimits.py).
    window_bytes: int = ExtensionLimits.window_bytes
    max_chunk_bytes: int = ExtensionLimits.max_chunk_bytes
    max_forwards: int = ExtensionLimits.max_forwards
    max_transfers: int = ExtensionLimits.max_transfers
    max_execs: int = ExtensionLimits.max_execs
    max_watches: int = ExtensionLimits.max_watches
    watch_queue_events: int = ExtensionLimits.watch_queue_events
    watch_window_events: int = ExtensionLimits.watch_window_events
    max_watched_directories: int = ExtensionLimits.max_watched_directories
    #: The config file this configuration came from, if any.
    config_file: str = ""
    #: Settings that were ignored: unknown agent.* options, bad env values (typos show up here).
    ignored_options: list[str] = field(default_factory=list)

    @property
    def logging_level(self) -> int:
        return LOG_LEVELS[self.log_level]

    @property
    def console_address(self) -> str:
        """Where the debug console listens; "" when it is off."""
        if not self.debug_console:
            return ""
        if self.debug_console_addr:
            return self.debug_console_addr
        return f"vsock://-1:{self.debug_console_vport}" if self.debug_console_vport else ""

    @property
    def log_port_address(self) -> str:
        if self.log_addr:
            return self.log_addr
        return f"vsock://-1:{self.log_vport}" if self.log_vport else ""

    def server_limits(self) -> Limits:
        """The ttRPC server's limits (max_connections as configured; see agent.limits)."""
        return Limits(**{name: getattr(self, name) for name in SERVER_LIMITS})

    def extension_limits(self) -> ExtensionLimits:
        """pykata.Extensions' limits as configured."""
        return ExtensionLimits(**{name: getattr(self, name) for name in EXTENSION_LIMITS})

    def announce_fields(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if not fields["ignored_options"]:
            del fields["ignored_options"]
        return fields


# --- value parsers (each names the option in its error) -----------------------


def parse_bool(value: str) -> bool:
    """true/false, else a number (non-zero is true), else false - as upstream."""
    if value in ("true", "false"):
        return value == "true"
    return value.isdigit() and int(value) != 0


def parse_log_level(option: str, value: str) -> str:
    if value not in LOG_LEVELS:
        raise ConfigError(
            f"{option}: invalid log level {value!r}; expected one of {', '.join(LOG_LEVELS)}"
        )
    return value


def _parse_int(option: str, value: str, what: str, bits: int, signed: bool) -> int:
    text = value[1:] if signed and value.startswith("-") else value
    if not text.isdigit():
        raise ConfigError(f"{option}: unable to parse {what} {value!r}: not a whole number")
    number = int(value)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= number <= high:
        raise ConfigError(f"{option}: {what} {value} is out of range")
    return number


def parse_timeout(option: str, value: str) -> int:
    return _parse_int(option, value, "timeout (seconds)", 64, signed=False)


def parse_port(option: str, value: str) -> int:
    return _parse_int(option, value, "vsock port", 32, signed=True)


def parse_pipe_size(option: str, value: str) -> int:
    size = _parse_int(option, value, "pipe size", 32, signed=True)
    if size < 0:
        raise ConfigError(f"{option}: container pipe size should not be negative, got {size}")
    return size


def parse_count(option: str, value: str) -> int:
    number = _parse_int(option, value, "number", 64, signed=True)
    if number <= 0:
        raise ConfigError(f"{option}: must be a positive number, got {number}")
    return number


def parse_microseconds(option: str, value: str) -> int:
    number = _parse_int(option, value, "microseconds", 32, signed=True)
    if not 0 <= number <= MAX_BUSY_POLL_US:
        raise ConfigError(f"{option}: must be 0 to {MAX_BUSY_POLL_US} microseconds, got {number}")
    return number


def parse_positive_float(option: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{option}: unable to parse number {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"{option}: must be a positive number, got {value}")
    return number


#: Settings that are limits of the ttRPC server (ttrpc.server.Limits fields).
SERVER_LIMITS = (
    "max_connections",
    "max_calls_per_connection",
    "guaranteed_calls",
    "max_calls",
    "reply_high_water",
    "max_queued_replies",
    "guaranteed_frame_bytes",
    "max_frame_bytes",
    "frame_timeout",
    "peer_log_rate",
    "peer_log_burst",
)
#: Every limit setting -> its parser; each is agent.NAME on the kernel command
#: line, NAME in the TOML file and KATA_AGENT_NAME (upper case) in the environment.
LIMITS: dict[str, Callable[[str, str], Any]] = {
    **{name: parse_count for name in SERVER_LIMITS},
    "frame_timeout": parse_positive_float,
    "peer_log_rate": parse_positive_float,
    "reserved_fds": parse_count,
    "log_queue_bytes": parse_count,
    "log_port_readers": parse_count,
    "busy_poll_us": parse_microseconds,
    **{name: parse_count for name in EXTENSION_LIMITS},
}


# --- kernel command line --------------------------------------------------------

# option -> (field, parser, guard). Flags (parser None) may stand alone.
_Parser = Callable[[str, str], Any]
_OPTIONS: dict[str, tuple[str, _Parser | None, Callable[[Any], bool] | None]] = {
    "agent.debug_console": ("debug_console", None, None),
    "agent.devmode": ("dev_mode", None, None),
    "agent.trace": ("tracing", None, None),
    "agent.log": ("log_level", parse_log_level, None),
    "agent.server_addr": ("server_addr", lambda _o, v: v, None),
    "agent.hotplug_timeout": ("hotplug_timeout", parse_timeout, lambda v: v > 0),
    "agent.debug_console_vport": ("debug_console_vport", parse_port, lambda v: v > 0),
    "agent.log_vport": ("log_vport", parse_port, lambda v: v > 0),
    "agent.container_pipe_size": ("container_pipe_size", parse_pipe_size, None),
    "agent.unified_cgroup_hierarchy": ("unified_cgroup_hierarchy", None, None),
    "systemd.unified_cgroup_hierarchy": ("unified_cgroup_hierarchy", None, None),
    "agent.owns_machine": ("owns_machine", None, None),
    "agent.policy_file": ("policy_file", lambda _o, v: v, None),
    "agent.trace_addr": ("trace_addr", lambda _o, v: v, None),
    "agent.debug_console_addr": ("debug_console_addr", lambda _o, v: v, None),
    "agent.restore_addr": ("restore_addr", lambda _o, v: v, None),
    **{f"agent.{name}": (name, parser, None) for name, parser in LIMITS.items()},
}
CONFIG_FILE_OPTION = "agent.config_file"


def from_cmdline(cmdline: str) -> AgentConfig:
    config = AgentConfig()
    for param in cmdline.split():
        key, eq, value = param.partition("=")
        if key == CONFIG_FILE_OPTION and eq:
            return from_file(value)
        spec = _OPTIONS.get(key)
        if spec is None:
            if key.startswith("agent."):
                config.ignored_options.append(param)
            continue
        name, parser, guard = spec
        if parser is None:  # a flag: bare means true
            setattr(config, name, parse_bool(value) if eq else True)
            continue
        if not eq:
            config.ignored_options.append(param)
            continue
        parsed = parser(key, value)
        if guard is None or guard(parsed):
            setattr(config, name, parsed)
    return config


# --- TOML config file ---------------------------------------------------------

_FILE_TYPES: dict[str, type[Any]] = {
    "debug_console": bool,
    "dev_mode": bool,
    "log_level": str,
    "hotplug_timeout": int,
    "debug_console_vport": int,
    "log_vport": int,
    "container_pipe_size": int,
    "server_addr": str,
    "unified_cgroup_hierarchy": bool,
    "tracing": bool,
    "run_dir": str,
    "trace_addr": str,
    "oci_runtime": str,
    "owns_machine": bool,
    "policy_file": str,
    "debug_console_addr": str,
    "log_addr": str,
    "restore_addr": str,
    **{name: float if LIMITS[name] is parse_positive_float else int for name in LIMITS},
}


def _file_value(path: str, key: str, value: Any) -> Any:
    if key == "hotplug_timeout" and isinstance(value, dict):  # serde's {secs, nanos} form
        value = value.get("secs", 0)
    expected = _FILE_TYPES[key]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{path}: {key} must be a {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    if key == "log_level":
        return parse_log_level(f"{path}: log_level", value)
    if key == "container_pipe_size" and value < 0:
        raise ConfigError(f"{path}: container_pipe_size should not be negative, got {value}")
    if key in LIMITS:
        return LIMITS[key](f"{path}: {key}", str(value))
    return value


def from_file(path: str) -> AgentConfig:
    import tomllib  # only with a configuration file: most agents have none

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read agent config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse agent config file {path}: {exc}") from exc
    config = AgentConfig(config_file=path)
    for key, value in data.items():
        if key not in _FILE_TYPES:
            raise ConfigError(
                f"{path}: unknown setting {key!r}; known settings: {', '.join(_FILE_TYPES)}"
            )
        setattr(config, key, _file_value(path, key, value))
    if config.hotplug_timeout <= 0:
        config.hotplug_timeout = AgentConfig.hotplug_timeout
    return config


# --- environment ----------------------------------------------------------------


def _env_limit(name: str) -> Callable[[str], Any]:
    variable = f"KATA_AGENT_{name.upper()}"
    return lambda value: LIMITS[name](variable, value)


#: Environment variable -> (setting, parser); the log level is handled on its own.
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    SERVER_ADDR_ENV: ("server_addr", str),
    TRACING_ENV: ("tracing", parse_bool),
    TRACE_ADDR_ENV: ("trace_addr", str),
    RUN_DIR_ENV: ("run_dir", str),
    OCI_RUNTIME_ENV: ("oci_runtime", str),
    OWNS_MACHINE_ENV: ("owns_machine", parse_bool),
    POLICY_FILE_ENV: ("policy_file", str),
    DEBUG_CONSOLE_ADDR_ENV: ("debug_console_addr", str),
    LOG_ADDR_ENV: ("log_addr", str),
    **{f"KATA_AGENT_{name.upper()}": (name, _env_limit(name)) for name in LIMITS},
}


def apply_env(config: AgentConfig, env: Mapping[str, str]) -> AgentConfig:
    level = env.get(LOG_LEVEL_ENV)
    if level is not None:
        if level in LOG_LEVELS:
            config.log_level = level
        else:  # upstream ignores a bad level here; the announce line shows it
            config.ignored_options.append(f"{LOG_LEVEL_ENV}={level}")
    for variable, (name, parser) in _ENV.items():
        if variable in env:
            setattr(config, name, parser(env[variable]))
    return config


def load(
    *,
    config_file: str | None = None,
    cmdline_path: str = "/proc/cmdline",
    env: Mapping[str, str] | None = None,
) -> AgentConfig:
    """The effective configuration, from every source in order of precedence."""
    if config_file:
        config = from_file(config_file)
    else:
        try:
            with open(cmdline_path) as f:
                cmdline = f.read()
        except OSError as exc:
            raise ConfigError(
                f"cannot read kernel command line {cmdline_path}: {exc.strerror}"
            ) from exc
        config = from_cmdline(cmdline)
    config = apply_env(config, os.environ if env is None else env)
    try:
        config.server_limits()
        config.extension_limits()
    except ValueError as exc:
        raise ConfigError(f"agent limits: {exc}") from None
    return config
