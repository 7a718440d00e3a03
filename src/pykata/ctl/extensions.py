"""kata-agent-ctl's commands for pykata.Extensions (docs/ctl.md): capabilities,
port-forward, cp, exec, watch. Each asks the agent's capabilities first and
refuses, in one line, an extension the agent lacks."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf import json_format

from .. import allocator
from ..api import extensions_pb2 as ext
from ..clihelp import Formatter
from ..extensions.client import Extensions, MissingExtension, ProtocolError
from ..extensions.forward import forward
from ..extensions.transfer import download, upload
from ..extensions.watch import watch
from ..transport import AddressError, HybridVsockAddress, TransportError, UnixAddress, parse_address
from ..ttrpc import Client, TtrpcError
from . import streamexec
from .progress import ProgressBar

CAPABILITIES_EPILOG = """\
examples:
  kata-agent-ctl capabilities unix:///tmp/kata-agent.sock
  kata-agent-ctl capabilities --hybrid-vsock unix:///run/vc/vm/ID/clh.sock
"""

PORT_FORWARD_EPILOG = """\
FORWARD is one of
  PORT                          local 127.0.0.1:PORT to the sandbox's 127.0.0.1:PORT
  LOCAL:REMOTE                  local 127.0.0.1:LOCAL to the sandbox's 127.0.0.1:REMOTE
  LOCAL:HOST:REMOTE             to HOST:REMOTE in the sandbox (an IP address)
  BIND:LOCAL:HOST:REMOTE        listening on BIND:LOCAL
  LOCAL:CONTAINER:/PATH         to the unix socket at PATH in CONTAINER (resolved
                                inside it: symlinks and '..' never lead out)
  LOCAL::/PATH                  to the unix socket at PATH in the shared directory
  BIND:LOCAL:CONTAINER:/PATH    listening on BIND:LOCAL
LOCAL 0 picks a free port. The first line on stdout says where it listens;
each connection is forwarded until both sides have closed. Ctrl-C stops.

examples:
  kata-agent-ctl port-forward unix:///tmp/kata-agent.sock 8080
  kata-agent-ctl port-forward unix:///tmp/kata-agent.sock 9000:80 &
  curl http://127.0.0.1:9000/
  kata-agent-ctl port-forward vsock://3:1024 0:10.0.0.2:5432
  kata-agent-ctl port-forward vsock://3:1024 9000:c1:/run/app.sock
"""


def _address_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "server_address",
        metavar="ADDRESS",
        help="the agent: vsock://CID:PORT, unix:///PATH, unix://@NAME, hvsock:///PATH:PORT",
    )
    parser.add_argument(
        "--hybrid-vsock", action="store_true", help="ADDRESS is a VMM's hybrid vsock socket"
    )
    parser.add_argument(
        "--hybrid-vsock-port",
        type=int,
        default=1024,
        metavar="PORT",
        help="the agent's port behind the hybrid vsock socket",
    )


def command_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    *,
    help: str,
    description: str,
    epilog: str,
) -> argparse.ArgumentParser:
    """The parser of an extension command, with the agent's address options."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=Formatter
    )
    _address_options(parser)
    return parser


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    command_parser(
        sub,
        "capabilities",
        help="what the agent is and which extensions it offers (pykata.Extensions)",
        description="Print the agent's answer to GetCapabilities as JSON: its version, "
        "the upstream API it implements, its extensions and their versions, its limits.",
        epilog=CAPABILITIES_EPILOG,
    )
    fwd = command_parser(
        sub,
        "port-forward",
        help="forward a local TCP port to a port (or a unix socket) inside the sandbox",
        description="Listen on a local TCP port and carry each connection to a TCP port "
        "in the sandbox's network namespace, or to a unix socket in a container "
        "(PortForward).",
        epilog=PORT_FORWARD_EPILOG,
    )
    fwd.add_argument("forward", metavar="FORWARD", help="which ports (see below)")
    _add_cp(sub)
    streamexec.add_parser(sub, command_parser)
    _add_watch(sub)


CP_EPILOG = """\
A path in a container is CONTAINER:PATH (PATH absolute, resolved inside the
container: symlinks and '..' never lead out); :PATH is in the shared
directory. Anything else is a local path (write ./a:b for a local name
with a colon). The file arrives atomically; a copy that broke goes on from
where it stopped when run again (--no-resume starts over).

examples:
  kata-agent-ctl cp unix:///tmp/kata-agent.sock ./image.tar c1:/tmp/image.tar
  kata-agent-ctl cp unix:///tmp/kata-agent.sock c1:/var/log/app.log ./app.log
  kata-agent-ctl cp vsock://3:1024 --mode 0755 ./tool c1:/usr/local/bin/tool
"""


def _add_cp(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cp = command_parser(
        sub,
        "cp",
        help="copy a file of any size into or out of a container",
        description="Copy one file between this machine and a container (Upload, "
        "Download), in chunks, checked with SHA-256, with a progress bar.",
        epilog=CP_EPILOG,
    )
    cp.add_argument("source", metavar="SRC", help="CONTAINER:PATH or a local file")
    cp.add_argument("dest", metavar="DST", help="CONTAINER:PATH or a local file")
    cp.add_argument(
        "--mode",
        type=lambda text: int(text, 8),
        metavar="OCTAL",
        help="permissions of the copy in a container (default: the local file's)",
    )
    cp.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start over, never resume"
    )
    cp.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="the progress bar on stderr: auto shows it on a terminal",
    )


def remote_path(text: str) -> ext.FileLocation | None:
    """CONTAINER:PATH (or :PATH) as a location; None for a local path."""
    if text.startswith(("/", "./", "../")) or ":" not in text:
        return None
    container, _, path = text.partition(":")
    return ext.FileLocation(container_id=container, path=path)


def _cp(args: argparse.Namespace) -> Callable[[Extensions], Awaitable[int]]:
    source, dest = remote_path(args.source), remote_path(args.dest)
    if (source is None) == (dest is None):
        raise UsageError("cp copies between a container and here: give one CONTAINER:PATH")
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    label = os.path.basename(args.source if dest is not None else args.dest)
    progress = ProgressBar(label) if show else (lambda done, total: None)

    async def run(extensions: Extensions) -> int:
        if dest is not None:
            local = Path(args.source)
            if not local.is_file():
                raise UsageError(f"{args.source}: no such file")
            await upload(
                extensions, local, dest, mode=args.mode, resume=args.resume, progress=progress
            )
        else:
            assert source is not None
            await download(
                extensions, source, Path(args.dest), resume=args.resume, progress=progress
            )
        return 0

    return run


WATCH_EPILOG = """\
Prints one line per change, as it happens: KIND PATH (RENAME OLD -> NEW),
a trailing / for a directory, and "# N events lost" where the agent had to
drop some because this tool read too slowly. Ctrl-C stops.

examples:
  kata-agent-ctl watch unix:///tmp/kata-agent.sock c1:/etc
  kata-agent-ctl watch -r vsock://3:1024 c1:/srv/data
"""


def _add_watch(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = command_parser(
        sub,
        "watch",
        help="print changes under a path in a container as they happen (Watch)",
        description="Print each create, modify, delete, rename and attribute change "
        "under a path inside a container (inotify in the agent).",
        epilog=WATCH_EPILOG,
    )
    parser.add_argument("where", metavar="CONTAINER:PATH", help="what to watch")
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="every directory below it too"
    )


def format_event(event: ext.FileEvent) -> str:
    kind = ext.FileEvent.Kind.Name(event.kind)
    slash = "/" if event.is_dir else ""
    if event.kind == ext.FileEvent.RENAME:
        return f"{kind} {event.old_path}{slash} -> {event.path}{slash}"
    return f"{kind} {event.path}{slash}"


def _watch(args: argparse.Namespace) -> Callable[[Extensions], Awaitable[int]]:
    location = remote_path(args.where)
    if location is None:
        raise UsageError(f"{args.where!r}: give CONTAINER:PATH")

    async def run(extensions: Extensions) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        async def report() -> None:
            async for events, lost in watch(extensions, location, recursive=args.recursive):
                if lost:
                    print(f"# {lost} events lost")
                for event in events:
                    print(format_event(event))
                sys.stdout.flush()

        reporting = asyncio.ensure_future(report())
        await asyncio.wait(
            [reporting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if reporting.done():
            reporting.result()
            return 1
        reporting.cancel()
        return 0

    return run


class UsageError(Exception):
    """A command line the tool cannot act on (exit status 2)."""


FORWARD_FORMS = (
    "PORT, LOCAL:REMOTE, LOCAL:HOST:REMOTE, BIND:LOCAL:HOST:REMOTE, "
    "LOCAL:CONTAINER:/PATH or BIND:LOCAL:CONTAINER:/PATH"
)


def parse_forward(text: str) -> tuple[str, int, ext.ForwardTarget]:
    """(bind address, local port, target) from FORWARD."""
    unix = text.find(":/")
    head = text[:unix] if unix >= 0 else text
    parts = head.split(":")
    try:
        if unix >= 0:
            if len(parts) not in (2, 3):
                raise ValueError
            bind, local, container = ["127.0.0.1", *parts] if len(parts) == 2 else parts
            socket_at = ext.FileLocation(container_id=container, path=text[unix + 1 :])
            target = ext.ForwardTarget(unix_socket=socket_at)
            remote = 1
        else:
            if len(parts) == 1:
                bind, local, host, port = "127.0.0.1", parts[0], "", parts[0]
            elif len(parts) == 2:
                bind, local, host, port = "127.0.0.1", parts[0], "", parts[1]
            elif len(parts) == 3:
                bind, local, host, port = "127.0.0.1", parts[0], parts[1], parts[2]
            elif len(parts) == 4:
                bind, local, host, port = parts
            else:
                raise ValueError
            remote = int(port)
            target = ext.ForwardTarget(host=host, port=remote)
        local_port = int(local)
    except ValueError:
        raise UsageError(f"FORWARD {text!r}: use {FORWARD_FORMS}") from None
    if not 0 <= local_port < 65536 or not 0 < remote < 65536:
        raise UsageError(f"FORWARD {text!r}: ports are 1..65535 (0 for a free local port)")
    return bind, local_port, target


def describe_target(target: ext.ForwardTarget) -> str:
    """Where a forward goes, for people."""
    if target.HasField("unix_socket"):
        where = target.unix_socket
        inside = f"container {where.container_id}" if where.container_id else "the shared directory"
        return f"unix socket {where.path} in {inside}"
    return f"{target.host or '127.0.0.1'}:{target.port} in the sandbox"


def run(args: argparse.Namespace) -> int:
    """Run an extension command; its exit status."""
    try:
        address = parse_address(args.server_address)
        if args.hybrid_vsock:
            if not isinstance(address, UnixAddress):
                raise UsageError(f"--hybrid-vsock needs a unix:///PATH address, not {address}")
            address = HybridVsockAddress(address.path, args.hybrid_vsock_port)
    except AddressError as exc:
        raise UsageError(str(exc)) from None
    command: Callable[[Extensions], Awaitable[int]]
    if args.command == "capabilities":
        command = _capabilities
    elif args.command == "port-forward":
        bind, local, target = parse_forward(args.forward)
        command = lambda e: _port_forward(e, bind, local, target)  # noqa: E731
    else:
        command = COMMANDS[args.command](args)
    allocator.keep_large_buffers()  # data in pieces of a megabyte, reused (allocator.py)
    return asyncio.run(_connected(str(address), command))


#: More commands: name -> (args -> command).
COMMANDS: dict[str, Callable[[argparse.Namespace], Callable[[Extensions], Awaitable[int]]]] = {
    "cp": _cp,
    "exec": streamexec.command,
    "watch": _watch,
}


async def _connected(address: str, command: Callable[[Extensions], Awaitable[int]]) -> int:
    try:
        client = await Client.connect(address, timeout=10.0)
    except (AddressError, TransportError) as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    try:
        return await command(Extensions(client))
    except MissingExtension as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    except (TtrpcError, ProtocolError) as exc:
        print(f"kata-agent-ctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a local file
        print(f"kata-agent-ctl: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        await client.close()


async def _capabilities(extensions: Extensions) -> int:
    caps = await extensions.capabilities()
    text = json_format.MessageToJson(caps, preserving_proto_field_name=True, indent=2)
    print(text)
    return 0


async def _port_forward(
    extensions: Extensions, bind: str, local: int, target: ext.ForwardTarget
) -> int:
    await extensions.require("PortForward")
    remote = describe_target(target)

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            await forward(extensions, reader, writer, target)
        except (TtrpcError, ProtocolError, ConnectionError) as exc:
            print(f"kata-agent-ctl: forward from {peer} to {remote}: {exc}", file=sys.stderr)
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(carry, bind, local)
    except OSError as exc:
        print(f"kata-agent-ctl: cannot listen on {bind}:{local}: {exc.strerror}", file=sys.stderr)
        return 1
    host, port = server.sockets[0].getsockname()[:2]
    print(f"forwarding {host}:{port} -> {remote}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    lost = asyncio.ensure_future(extensions.client.wait_closed())
    async with server:
        await asyncio.wait(
            [asyncio.ensure_future(stop.wait()), lost], return_when=asyncio.FIRST_COMPLETED
        )
    if lost.done():
        print("kata-agent-ctl: connection to the agent lost", file=sys.stderr)
        return 1
    return 0


#: The commands of this module.
NAMES = ("capabilities", "port-forward", "cp", "exec", "watch")
