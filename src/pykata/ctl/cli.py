"""kata-agent-ctl command line, upstream-compatible."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

from .. import __version__
from .. import log as logsetup
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
from . import vm as vm_mod
from .autovalues import AutoValues
from .examples import EXAMPLES
from .repl import interact
from .session import Quit, Session
from .tracing import ClientTracing

LEVELS = logsetup.LEVELS


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kata-agent-ctl",
        description="Call any Kata agent API, with any parameters, scripted or interactive.",
        epilog="Run 'kata-agent-ctl examples' for working examples.",
    )
    top.add_argument(
        "-l",
        "--log-level",
        choices=list(LEVELS),
        default="warn",
        help="log level for the tool's own messages (stderr)",
    )
    top.add_argument("--version", action="version", version=f"kata-agent-ctl {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    connect = sub.add_parser(
        "connect",
        help="connect to an agent and run commands",
        description="Connect to an agent and run commands in order.",
    )
    connect.add_argument(
        "--server-address",
        metavar="ADDRESS",
        help="vsock://CID:PORT, unix:///PATH, unix://@NAME, hvsock:///PATH:PORT (not with --vm)",
    )
    connect.add_argument(
        "--hybrid-vsock",
        action="store_true",
        help="the unix:// address is a VMM's hybrid vsock socket",
    )
    connect.add_argument(
        "--hybrid-vsock-port",
        type=int,
        default=1024,
        metavar="PORT",
        help="the agent's port behind the hybrid vsock socket (default 1024)",
    )
    connect.add_argument(
        "--bundle-dir",
        type=Path,
        metavar="DIR",
        help="OCI bundle (or rootfs) used for CreateContainer and run",
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
        f"run (with --vm: the guest image's {GUEST_ROOTFS})",
    )
    connect.add_argument(
        "-c",
        "--cmd",
        action="append",
        default=[],
        metavar="COMMAND",
        help="a command to run (repeatable, run in order)",
    )
    connect.add_argument(
        "--ignore-errors", action="store_true", help="go on after a failed command, and exit 0"
    )
    connect.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="read commands from a prompt (after any -c commands)",
    )
    connect.add_argument(
        "-n",
        "--no-auto-values",
        action="store_true",
        help="send exactly what is given: no generated ids or fields",
    )
    connect.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="deadline for each call (and for connecting)",
    )
    connect.add_argument(
        "--output",
        choices=["text", "json"],
        default="text",
        help="text (readable) or json (one object per line)",
    )
    connect.add_argument(
        "--trace",
        metavar="ADDRESS",
        help="trace this run: send a W3C traceparent with every request and this tool's "
        "spans to the kata-trace-forwarder at ADDRESS (unix:///PATH, vsock://CID:PORT)",
    )
    connect.add_argument(
        "--vm",
        choices=["qemu"],
        metavar="HYPERVISOR",
        help="boot a guest VM with the agent (qemu), run the commands, stop it",
    )
    vm_mod.add_vm_options(connect)
    vm_mod.add_parser(sub)
    console = sub.add_parser(
        "console",
        help="open the agent's debug console, or run one command in it",
        description="Open the agent's debug console (agent.debug_console), interactively "
        "or to run one command whose output and exit status become this tool's.",
        epilog="examples:\n"
        "  kata-agent-ctl console unix:///tmp/console.sock\n"
        "  kata-agent-ctl console vsock://3:1026 -c 'cat /proc/meminfo'\n"
        "  kata-agent-ctl console --hybrid-vsock unix:///run/vc/vm/ID/kata.hvsock -c dmesg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="the console's port behind the hybrid vsock socket (default %(default)s)",
    )
    console.add_argument(
        "-c", "--command", dest="run", help="run this one command and exit with its status"
    )
    console.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    sub.add_parser("generate-cid", help="print a new container id")
    sub.add_parser("generate-sid", help="print a new sandbox id")
    sub.add_parser("examples", help="print examples")
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


def connect(args: argparse.Namespace) -> int:
    if not args.cmd and not args.interactive:
        print("kata-agent-ctl: nothing to do: give -c COMMAND or --interactive", file=sys.stderr)
        return 2
    if bool(args.vm) == bool(args.server_address):
        print(
            "kata-agent-ctl: give either --server-address (a running agent) or --vm qemu "
            "(boot one)",
            file=sys.stderr,
        )
        return 2
    if args.shared_bundle and not args.bundle_dir:
        print("kata-agent-ctl: --shared-bundle needs --bundle-dir", file=sys.stderr)
        return 2
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
        tracing=tracing,
    )
    try:
        for command in args.cmd:
            ok = loop.run_until_complete(session.execute(command))
            if not ok and not args.ignore_errors:
                return 1
        if args.interactive:
            interact(session, loop)
    except Quit:
        pass
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        if tracing is not None:
            tracing.stop(failed=bool(session.failures))
    return 1 if session.failures and not args.ignore_errors else 0


def console(args: argparse.Namespace) -> int:
    try:
        sock = connect_blocking(address_of(args), timeout=args.timeout or 10.0)
    except (AddressError, TransportError) as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    with sock:
        sock.settimeout(None)
        if args.run is None:
            console_mod.interactive(sock)
            return 0
        try:
            output, status = console_mod.run_command(sock, args.run, args.timeout)
        except (TimeoutError, ConnectionError) as exc:
            print(f"kata-agent-ctl: {exc}", file=sys.stderr)
            return 1
    sys.stdout.buffer.write(output)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logsetup.setup(LEVELS[args.log_level], name="kata-agent-ctl", source="ctl")
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
    return connect(args)


if __name__ == "__main__":
    sys.exit(main())
