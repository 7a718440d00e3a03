"""kata-agent command line: read the configuration, serve until told to stop."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, allocator
from .. import log as logsetup
from ..transport import AddressError, TransportError
from ..ttrpc import Server, UnaryServerInterceptor
from ..ttrpc.server import StreamServerInterceptor
from . import config as configmod
from . import init, interceptors, leftovers, limits, lttng, reaper
from . import runtime as runtime_mod
from .copyfile import SharedFiles
from .diagnostics import Diagnostics, RecentLogs
from .errors import AgentError
from .guest import Guest
from .memagent import MemAgent
from .policy import Enforcer
from .runtime import OciRuntime
from .sandbox import Sandbox
from .serving import AgentParts, services
from .volumes import Volumes, mount_at

if TYPE_CHECKING:  # loaded only when configured: a pty and a shell are rarely wanted,
    # and the span machinery only with tracing on
    from .console import DebugConsole, LogPort
    from .traceprovider import TraceProvider

log = logging.getLogger("pykata.agent")
LTTNG_ENV = "KATA_AGENT_LTTNG"

EPILOG = """\
configuration (lowest precedence first):
  defaults < kernel command line (agent.* options in /proc/cmdline,
  or the TOML file named by agent.config_file= / --config) < environment

environment:
  KATA_AGENT_SERVER_ADDR   address to serve on (default vsock://-1:1024)
  KATA_AGENT_LOG_LEVEL     critical|error|warn|info|debug|trace
  KATA_AGENT_TRACING       true|false
  KATA_AGENT_TRACE_ADDR    the trace forwarder (default vsock://2:10240)
  KATA_AGENT_RUN_DIR       bundles and runtime state (default /run/kata-containers)
  KATA_AGENT_OCI_RUNTIME   auto (crun where it works, else runc), crun, runc or a path
  KATA_AGENT_OWNS_MACHINE  true: act on the whole machine (clock, CPUs, swap) even
                           when not PID 1 (default: only as PID 1)
  KATA_AGENT_POLICY_FILE   the initial agent policy, TOML (docs/policy.md)
  KATA_AGENT_DEBUG_CONSOLE_ADDR  debug console address, when agent.debug_console is on
                           (default vsock://-1:<agent.debug_console_vport>)
  KATA_AGENT_LOG_ADDR      serve log lines here too (default vsock://-1:<agent.log_vport>)
  KATA_AGENT_LTTNG         true: log records also as LTTng events (python3-lttngust)
  KATA_AGENT_MAX_CONNECTIONS, KATA_AGENT_MAX_CALLS, ... every limit (docs/agent.md, Limits)

examples:
  # stand-alone on a development host, talking to it with kata-agent-ctl
  KATA_AGENT_SERVER_ADDR=unix:///tmp/agent.sock kata-agent
  KATA_AGENT_SERVER_ADDR=unix://@kata-agent KATA_AGENT_LOG_LEVEL=debug kata-agent
  kata-agent --config /etc/kata-agent.toml
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kata-agent",
        description="pykata's Kata Containers agent: serves the agent API over ttRPC.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kata-agent {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="read the configuration from this TOML file (default: none, the kernel "
        "command line's options)",
    )
    parser.add_argument(
        "--kernel-cmdline",
        metavar="FILE",
        default="/proc/cmdline",
        help="read agent.* options from FILE (testing aid; default: /proc/cmdline)",
    )
    return parser.parse_args(argv)


def agent_parts(
    config: configmod.AgentConfig, runtime: OciRuntime, recent: RecentLogs
) -> AgentParts:
    run_dir = Path(config.run_dir)
    owns_machine = config.owns_machine or os.getpid() == 1
    sandbox = Sandbox(
        runtime, run_dir, pipe_size=config.container_pipe_size, owns_machine=owns_machine
    )
    guest = Guest(owns_machine=owns_machine)
    shared = run_dir / "shared" / "containers"
    return AgentParts(
        sandbox=sandbox,
        guest=guest,
        files=SharedFiles(shared),
        volumes=Volumes(run_dir, run_dir / "shared"),
        memory=MemAgent(guest),
        policy=Enforcer.from_file(config.policy_file),
        diagnostics=Diagnostics(sandbox, recent, shared),
    )


def call_interceptors(
    policy: Enforcer, tracing: TraceProvider | None
) -> list[UnaryServerInterceptor]:
    """Around every call, outermost first: its span (if tracing), inside which the policy
    decides (so a denied call is a failed span)."""
    chain = [interceptors.policy(policy)]
    if tracing is not None:
        chain.insert(0, interceptors.rpc_spans(tracing.tracer, tracing.root_context))
    return chain


def stream_interceptors(tracing: TraceProvider | None) -> list[StreamServerInterceptor]:
    """Around every streaming call (pykata.Extensions): its span, if tracing. The policy
    decides in the handler, on the stream's opening message."""
    if tracing is None:
        return []
    return [interceptors.stream_spans(tracing.tracer, tracing.root_context)]


async def serve(config: configmod.AgentConfig, runtime_binary: str, started: float) -> None:
    asyncio.get_running_loop().set_exception_handler(logsetup.loop_exception_handler)
    run_dir = Path(config.run_dir)
    runtime = OciRuntime(runtime_binary, run_dir / "runtime", no_pivot=root_is_initial_ramfs())
    recent = RecentLogs(logsetup.JsonFormatter("kata-agent", "agent"))
    logging.getLogger("pykata").addHandler(recent)
    parts = agent_parts(config, runtime, recent)
    sandbox = parts.sandbox
    await leftovers.clean(run_dir, runtime, parts.files)
    # Signals first: a SIGTERM that comes as soon as the socket exists must stop us
    # gracefully, not kill us with the default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if os.getpid() == 1:
        # As upstream's agent: the sandbox destroyed, the guest's work is done (power-off).
        parts.after_sandbox_destroyed = stop.set
    # Without tracing the server is made, and its port opened with the first
    # connection ready, before parking: a restored guest runs every code path anew
    # (software emulation translates it again), so the less is left the sooner it serves.
    server = None if config.tracing else make_server(config, parts, None)
    ready = None
    if server is not None and config.restore_addr:
        ready = await server.start(config.server_addr, start_serving=False)
    if config.restore_addr and not await parked_until_restored(config, parts, stop):
        log.info("stopped while parked")
        if ready is not None:
            ready.close()
        await parts.memory.stop()
        return
    # The root span starts here, after any restore: its clock is the new guest's.
    tracing = None
    if config.tracing:
        from .traceprovider import TraceProvider

        tracing = TraceProvider(config.trace_addr)
    server = server or make_server(config, parts, tracing)
    if ready is not None:
        await ready.start_serving()
    else:
        await server.start(config.server_addr)
    console = await start_console(config)
    log_port = await start_log_port(config)
    log.info(
        "agent serving",
        extra={
            "address": config.server_addr,
            "startup_ms": round((time.monotonic() - started) * 1e3, 1),
        },
    )
    sweeper = asyncio.ensure_future(sweep_orphans())
    await stop.wait()
    log.info("shutting down")
    # Containers first: their end also ends calls waiting on them (WaitProcess, reads).
    if console is not None:
        console.close()
    await sandbox.destroy()
    await server.shutdown(grace=5.0)
    await parts.memory.stop()
    sweeper.cancel()
    if tracing is not None:
        await asyncio.to_thread(tracing.stop)
    log.info("agent stopped")
    if log_port is not None:
        log_port.close()


def make_server(
    config: configmod.AgentConfig, parts: AgentParts, tracing: TraceProvider | None
) -> Server:
    server_limits = dataclasses.replace(
        config.server_limits(),
        max_connections=limits.connections_that_fit(config.max_connections, config.reserved_fds),
    )
    return Server(
        services(parts, server_limits, config.extension_limits()),
        interceptors=call_interceptors(parts.policy, tracing),
        stream_interceptors=stream_interceptors(tracing),
        limits=server_limits,
        busy_poll=config.busy_poll_us / 1e6,
    )


async def parked_until_restored(
    config: configmod.AgentConfig, parts: AgentParts, stop: asyncio.Event
) -> bool:
    """Wait, parked for a snapshot, until restored (True) or told to stop (False).

    Before anything is served: a restored guest answers nothing as the snapshot's copy.
    """
    from . import restore  # only a guest made for snapshots parks

    parked = asyncio.ensure_future(restore.park_until_restored(config.restore_addr, parts.guest))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({parked, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not parked.done():
        parked.cancel()
        return False
    parked.result()
    return True


async def start_console(config: configmod.AgentConfig) -> DebugConsole | None:
    address = config.console_address
    if not address:
        if config.debug_console_addr and not config.debug_console:
            log.warning("debug console address given but agent.debug_console is off: no console")
        return None
    from .console import DebugConsole, shell_or_error

    console = DebugConsole(shell_or_error())
    await console.start(address)
    return console


async def start_log_port(config: configmod.AgentConfig) -> LogPort | None:
    address = config.log_port_address
    if not address:
        return None
    from .console import LogPort

    port = LogPort(logsetup.JsonFormatter("kata-agent", "agent"), config.log_port_readers)
    await port.start(address)
    log.info("log port listening", extra={"address": address})
    return port


async def sweep_orphans(period: float = 2.0) -> None:
    """Zombies reparented to us that no one waits for (see reaper.Orphans)."""
    while True:
        await asyncio.sleep(period)
        for pid in reaper.orphans.sweep():
            log.debug("reaped orphan", extra={"pid": pid})


def root_is_initial_ramfs() -> bool:
    """Is / the kernel's initial ramfs (a guest booted from an initrd with no root disk)?"""
    return mount_at(Path("/")).fstype == "rootfs"


def run(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, on uvloop's faster event loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    if os.getpid() != 1:
        return agent_main(argv, as_init=False)
    # PID 1 of a guest (or of a PID namespace): an init's duties, and never a plain exit.
    # The kernel starts init with no PATH; upstream's agent sets this one.
    os.environ.setdefault("PATH", init.INIT_PATH)
    try:
        init.mount_proc()
    except OSError as exc:
        print(f"kata-agent: {exc}", file=sys.stderr)
    try:
        return agent_main(argv, as_init=True)
    except BaseException:
        # Said now: power-off comes before Python would print the traceback.
        traceback.print_exc()
        raise
    finally:
        init.power_off()


def agent_main(argv: list[str] | None, *, as_init: bool) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    try:
        config = configmod.load(config_file=args.config, cmdline_path=args.kernel_cmdline)
    except configmod.ConfigError as exc:
        print(f"kata-agent: {exc}", file=sys.stderr)
        return 1
    log_writer = logsetup.setup(
        config.logging_level, name="kata-agent", source="agent", queue_bytes=config.log_queue_bytes
    )
    logsetup.install_hooks()
    allocator.keep_large_buffers()
    open_files, _ = limits.raise_fd_limit()
    log.info(
        "announce",
        extra={
            "version": __version__,
            "config": config.announce_fields(),
            "open_files_limit": open_files,
        },
    )
    if as_init:
        try:
            init.setup(config.unified_cgroup_hierarchy)
        except OSError as exc:
            log.error("init mounts incomplete: %s", exc)
        channels = [
            config.server_addr, config.console_address, config.log_port_address,
            config.restore_addr,
        ]  # fmt: skip
        if config.tracing:
            channels.append(config.trace_addr)
        init.load_modules(init.modules_for([a for a in channels if a]))
        init.soft_ctrl_alt_del()
    if configmod.parse_bool(os.environ.get(LTTNG_ENV, "false")):
        lttng.load_python_agent()
    try:
        reaper.become_subreaper()
    except OSError as exc:
        log.warning("cannot become the child subreaper (%s): exit statuses may be lost", exc)
    try:
        # Before any thread exists: unshare() refuses threaded processes.
        if not as_init and os.geteuid() == 0:
            runtime_mod.enter_private_mount_namespace()
        runtime_binary = runtime_mod.choose(config.oci_runtime)
        log.info("OCI runtime", extra={"runtime": runtime_binary})
        # From here on log lines are written by a thread: a slow console never stalls a call.
        log_writer.start()
        run(serve(config, runtime_binary, started))
    except (AddressError, TransportError, AgentError) as exc:
        log.critical(str(exc))
        print(f"kata-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
