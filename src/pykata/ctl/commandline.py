"""kata-agent-ctl's command line, upstream-compatible: options, running the commands,
exit statuses."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from .. import log as logsetup
from ..clihelp import Formatter
from ..transport import (
    Address,
    AddressError,
    HybridVsockAddress,
    TransportError,
    UnixAddress,
    connect_blocking,
    parse_address,
)
from ..ttrpc import Client
from ..vm import GUEST_ROOTFS, GUEST_SHARE
from . import console as console_mod
from . import extensions, terminal
from . import vm as vm_mod
from .autovalues import AutoValues
from .examples import EXAMPLES
from .repl import interact
from .session import SYNTAX, Quit, Session, builtins_table
from .tracing import ClientTracing

LEVELS = logsetup.LEVELS


CONNECT_EPILOG = """\
{syntax}

built-in commands:
{builtins}

examples:
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock -c Check -c Version
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock --bundle-dir ./rootfs \\
      -c 'run /bin/sh -c "echo hello; exit 3"'     # exits 3, as docker run would
  kata-agent-ctl connect --server-address vsock://3:1024 -c 'SignalProcess signal=TERM'
  kata-agent-ctl connect --vm qemu -c Check -c 'run /bin/uname -a'
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock --interactive

'kata-agent-ctl examples' prints more, each one working as pasted.
"""


def _connect_epilog() -> str:
    return CONNECT_EPILOG.format(syntax=SYNTAX, builtins="\n".join(builtins_table()))


def duration(text: str) -> float | None:
    """--timeout: seconds (`2.5`) or upstream's human form (`500ms`, `5s`, `7m`); 0: none."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (seconds, or 99ns, 30us, 2ms, 5s, 7m, 1h; 0: none)"
        )
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    seconds = float(match.group(1)) * scale.get(match.group(2) or "s", 1)
    return seconds or None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kata-agent-ctl",
        description="Call any Kata agent API, with any parameters, scripted or interactive.",
        epilog="Run 'kata-agent-ctl COMMAND --help' for a command's options, and "
        "'kata-agent-ctl examples' for working examples.",
        formatter_class=Formatter,
    )
    top.add_argument(
        "-l",
        "--log-level",
        choices=[*LEVELS, "warning"],
        default="warn",
        metavar="LEVEL",
        help="the tool's own log on stderr: critical, error, warn (warning), info, debug "
        "(every request, as sent) or trace",
    )
    top.add_argument("--version", action="version", version=f"kata-agent-ctl {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    connect = sub.add_parser(
        "connect",
        help="connect to an agent (or boot one with --vm) and run commands",
        description="Connect to an agent and run commands in order: agent API calls by "
        "name, and built-ins such as run. The run stops at the first command that fails.",
        epilog=_connect_epilog(),
        formatter_class=Formatter,
    )
    connect.add_argument(
        "--server-address",
        metavar="ADDRESS",
        help="the agent: vsock://CID:PORT, unix:///PATH, unix://@NAME, hvsock:///PATH:PORT "
        "(default: none; give this or --vm)",
    )
    connect.add_argument(
        "--hybrid-vsock",
        action="store_true",
        help="the unix:// address is a VMM's hybrid vsock socket (Cloud Hypervisor, Firecracker)",
    )
    connect.add_argument(
        "--hybrid-vsock-port",
        type=int,
        default=1024,
        metavar="PORT",
        help="the agent's port behind the hybrid vsock socket",
    )
    connect.add_argument(
        "--bundle-dir",
        type=Path,
        metavar="DIR",
        help="OCI bundle (config.json and rootfs), or just a rootfs directory, for "
        "CreateContainer and run (default: none)",
    )
    connect.add_argument(
        "--shared-bundle",
        action="store_true",
        help="--bundle-dir is shared with the guest (kata-agent-ctl vm --bundle-dir): "
        "containers mount it (virtio-fs) and use it at its guest path",
    )
    connect.add_argument(
        "--guest-rootfs",
        metavar="PATH",
        help="without --bundle-dir: a rootfs on the agent's machine for CreateContainer and "
        f"run (default: none; with --vm, the guest image's {GUEST_ROOTFS})",
    )
    connect.add_argument(
        "-c",
        "--cmd",
        action="append",
        default=[],
        metavar="COMMAND",
        help="a command to run; repeatable, run in order (default: none; give this or -i)",
    )
    connect.add_argument(
        "--ignore-errors", action="store_true", help="go on after a failed command, and exit 0"
    )
    connect.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="read commands from a prompt, after any -c commands",
    )
    connect.add_argument(
        "-n",
        "--no-auto-values",
        action="store_true",
        help="send exactly what is given: no generated ids or fields",
    )
    connect.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="deadline for connecting and for each call: seconds, or 500ms, 5s, 2m "
        "(default: 10s to connect, none for calls)",
    )
    connect.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="text (for people) or json (one object per line)",
    )
    connect.add_argument(
        "--trace",
        metavar="ADDRESS",
        help="trace this run: a W3C traceparent with every request, and this tool's "
        "spans to the kata-trace-forwarder at ADDRESS (default: off)",
    )
    connect.add_argument(
        "--vm",
        choices=["qemu"],
        metavar="HYPERVISOR",
        help="boot a guest VM whose init is the agent (qemu), run the commands, stop it "
        "(default: none; give this or --server-address)",
    )
    vm_mod.add_vm_options(connect)
    vm_mod.add_parser(sub)
    console = sub.add_parser(
        "console",
        help="open the agent's debug console, or run one command in it",
        description="Open the agent's debug console (agent.debug_console): interactive "
        "in a terminal; a script when stdin is a pipe or file, or one command with -c - "
        "then only its output is printed, and its exit status is the tool's.",
        epilog="examples:\n"
        "  kata-agent-ctl console unix:///tmp/console.sock\n"
        "  kata-agent-ctl console vsock://3:1026 -c 'cat /proc/meminfo'\n"
        "  echo 'uname -a; df -h' | kata-agent-ctl console vsock://3:1026\n"
        "  kata-agent-ctl console --hybrid-vsock unix:///run/vc/vm/ID/kata.hvsock -c dmesg",
        formatter_class=Formatter,
    )
    console.add_argument("server_address", metavar="ADDRESS", help="the console's address")
    console.add_argument(
        "--hybrid-vsock", action="store_true", help="ADDRESS is a VMM's hybrid vsock socket"
    )
    console.add_argument(
        "--hybrid-vsock-port",
        type=int,
        default=console_mod.DEFAULT_PORT,
        metavar="PORT",
        help="the console's port behind the hybrid vsock socket",
    )
    console.add_argument(
        "-c",
        "--command",
        dest="run",
        help="run this one command and exit with its status (default: interactive)",
    )
    console.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="give up after this long: seconds, or 500ms, 5s, 2m (default: 10s to connect, "
        "then no limit)",
    )
    extensions.add_parsers(sub)
    sub.add_parser(
        "generate-cid", help="print a new container id", description="Print a new container id."
    )
    sub.add_parser(
        "generate-sid", help="print a new sandbox id", description="Print a new sandbox id."
    )
    sub.add_parser(
        "examples",
        help="print examples that work as pasted",
        description="Print examples that work as pasted, once their variables are set.",
    )
    return top


def address_of(args: argparse.Namespace) -> Address:
    address = parse_address(args.server_address)
    if args.hybrid_vsock:
        if not isinstance(address, UnixAddress):
            raise AddressError(
                f"--hybrid-vsock needs a unix:///PATH address, not {args.server_address!r}"
            )
        return HybridVsockAddress(address.path, args.hybrid_vsock_port)
    return address


async def _connect(args: argparse.Namespace) -> Client:
    return await Client.connect(address_of(args), timeout=args.timeout or 10.0)


class UsageError(Exception):
    """A command line the tool cannot act on: one line on stderr, exit status 2."""


def connect(args: argparse.Namespace) -> int:
    if not args.cmd and not args.interactive:
        raise UsageError("nothing to do: give -c COMMAND or --interactive")
    if bool(args.vm) == bool(args.server_address):
        raise UsageError("give either --server-address (a running agent) or --vm qemu (boot one)")
    if args.shared_bundle and not args.bundle_dir:
        raise UsageError("--shared-bundle needs --bundle-dir")
    if args.bundle_dir is not None and not args.bundle_dir.is_dir():
        raise UsageError(f"--bundle-dir {args.bundle_dir}: no such directory")
    try:
        if args.server_address:
            address_of(args)
    except AddressError as exc:
        raise UsageError(f"--server-address: {exc}") from None
    try:
        if args.trace:
            parse_address(args.trace)
    except AddressError as exc:
        raise UsageError(f"--trace: {exc}") from None
    if not args.vm:
        return run_commands(args, shared_bundle=args.shared_bundle)
    return vm_mod.connect(args, run_commands)


def run_commands(args: argparse.Namespace, *, shared_bundle: bool = False) -> int:
    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(_connect(args))
    except (AddressError, TransportError) as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    auto = AutoValues(
        bundle_dir=args.bundle_dir,
        guest_rootfs=args.guest_rootfs,
        guest_bundle=GUEST_SHARE if shared_bundle else None,
    )
    tracing = ClientTracing(args.trace, str(address_of(args))) if args.trace else None
    if tracing is not None:
        client.interceptors.append(tracing.intercept)
    session = Session(
        client,
        None if args.no_auto_values else auto,
        output=args.output,
        timeout=args.timeout,
        stdin_free=not args.interactive,
        tracing=tracing,
    )
    try:
        for command in args.cmd:
            ok = execute(session, loop, command)
            if session.interrupted is not None or session.output_closed:
                break
            if not ok and not args.ignore_errors:
                break
        else:
            if args.interactive:
                interact(session, lambda line: execute(session, loop, line))
    except Quit:
        pass
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        if tracing is not None:
            tracing.stop(failed=bool(session.failures))
    if session.interrupted is not None and not args.interactive:
        return 128 + session.interrupted
    if session.output_closed:
        return 128 + signal.SIGPIPE
    if args.ignore_errors:
        return 0
    return session.status if session.failures else 0


def execute(session: Session, loop: asyncio.AbstractEventLoop, line: str) -> bool:
    """One command line; SIGINT and SIGTERM meanwhile go to the session, not Python."""
    handlers: dict[int, Callable[[int], None]] = {
        signal.SIGINT: session.interrupt,
        signal.SIGTERM: session.interrupt,
    }
    with terminal.signals_to_loop(loop, handlers):
        return loop.run_until_complete(session.execute(line))


def console(args: argparse.Namespace) -> int:
    try:
        address = address_of(args)
    except AddressError as exc:
        raise UsageError(str(exc)) from None
    script = args.run
    if script is None and not os.isatty(sys.stdin.fileno()):
        try:
            script = console_mod.read_script(sys.stdin.buffer)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        sock = connect_blocking(address, timeout=args.timeout or 10.0)
    except TransportError as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    with sock:
        sock.settimeout(None)
        if script is None:
            console_mod.interactive(sock)
            return 0
        try:
            output, status = console_mod.run_command(sock, script, args.timeout)
        except (TimeoutError, ConnectionError) as exc:
            print(f"kata-agent-ctl: {exc}", file=sys.stderr)
            return 1
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    return status


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        level = LEVELS["warn" if args.log_level == "warning" else args.log_level]
        logsetup.setup(level, name="kata-agent-ctl", source="ctl")
        return _main(args)
    except UsageError as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before or after the commands (connecting, a VM booting)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # our reader has gone (| head): as SIGPIPE would end us
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(args: argparse.Namespace) -> int:
    if args.command == "generate-cid" or args.command == "generate-sid":
        print(uuid.uuid4().hex)
        return 0
    if args.command == "examples":
        print(EXAMPLES, end="")
        return 0
    if args.command == "console":
        return console(args)
    if args.command == "vm":
        return vm_mod.run(args)
    if args.command in extensions.NAMES:
        try:
            return extensions.run(args)
        except extensions.UsageError as exc:
            raise UsageError(str(exc)) from None
    return connect(args)
