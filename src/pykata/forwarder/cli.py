"""kata-trace-forwarder: receive the agent's spans, send them on.

Options as upstream's, plus --otlp-protocol, --listen and --output.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import pwd
import re
import signal
import subprocess
import sys

from .. import __version__
from .. import log as logsetup
from ..otlp import MAX_RECORD
from ..transport import (
    AddressError,
    HybridVsockAddress,
    TransportError,
    UnixAddress,
    VsockAddress,
    as_address,
)
from .exporters import DumpSink, FileSink, GrpcSink, HttpSink, Queue, Sink
from .server import Limits, Receiving, listen

log = logging.getLogger("pykata.forwarder")

LEVELS = logsetup.LEVELS

EPILOG = """\
examples:
  # QEMU (vsock): spans from every guest on port 10240 to a local collector
  kata-trace-forwarder
  # Cloud Hypervisor / Firecracker (hybrid vsock): listens on <socket-path>_10240
  sudo kata-trace-forwarder --socket-path /run/vc/vm/$sandbox_id/clh.sock
  # a stand-alone agent (KATA_AGENT_TRACE_ADDR=unix:///tmp/spans.sock), spans to a file
  kata-trace-forwarder --listen unix:///tmp/spans.sock --output /tmp/spans.jsonl
  # a collector speaking OTLP over HTTP
  kata-trace-forwarder --otlp-protocol http --otlp-endpoint http://localhost:4318
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-trace-forwarder",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Forward the Kata agent's spans (OTLP records over vsock, hybrid vsock or "
        "a unix socket) to an OpenTelemetry collector or a file.",
    )
    p.add_argument("--version", action="version", version=f"kata-trace-forwarder {__version__}")
    p.add_argument("-l", "--log-level", choices=list(LEVELS), default="info")
    p.add_argument(
        "--trace-name",
        default="kata-agent",
        help="service name given to the spans (default kata-agent)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default="http://localhost:4317",
        help="the collector (default http://localhost:4317)",
    )
    p.add_argument("--otlp-protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--socket-path", help="hybrid vsock: the VMM socket; listens on PATH_PORT")
    p.add_argument("--vsock-cid", type=int, default=-1, help="vsock CID to listen on (-1: any)")
    p.add_argument("--vsock-port", type=int, default=10240, help="vsock port (default 10240)")
    p.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="listen on any transport address instead (unix:///..., unix://@...)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write OTLP JSON lines to FILE ('-': stdout) instead of a collector",
    )
    p.add_argument("--dump-only", action="store_true", help="print spans instead of exporting them")
    limits = Limits()
    p.add_argument(
        "--queue-bytes",
        type=size,
        default=64 << 20,
        metavar="SIZE",
        help="spans held for the collector, in bytes of OTLP (default 64M); past it new "
        "spans are dropped and counted",
    )
    p.add_argument(
        "--max-record",
        type=size,
        default=MAX_RECORD,
        metavar="SIZE",
        help="largest record accepted from an agent (default 4M); larger ones are skipped unread",
    )
    p.add_argument(
        "--receive-bytes",
        type=size,
        default=limits.receive_limit,
        metavar="SIZE",
        help="bytes of records being received, all connections together (default 32M)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        help=f"agent connections at once (default {limits.max_connections})",
    )
    return p


def size(text: str) -> int:
    """A byte count: 4096, 64K, 4M, 1G (binary units)."""
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (4096, 64K, 4M, 1G)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def listen_address(args: argparse.Namespace) -> str:
    if args.listen:
        return str(args.listen)
    if args.socket_path:
        return str(HybridVsockAddress(args.socket_path, args.vsock_port))
    return str(VsockAddress(args.vsock_cid, args.vsock_port))


def make_sink(args: argparse.Namespace) -> Sink:
    if args.dump_only:
        return DumpSink()
    if args.output:
        if args.output == "-":
            return FileSink(sys.stdout, "stdout")
        return FileSink(open(args.output, "a", encoding="utf-8"), args.output)
    if args.otlp_protocol == "http":
        return HttpSink(args.otlp_endpoint)
    return GrpcSink(args.otlp_endpoint)


def drop_privileges() -> None:
    """Root was only needed to bind: go on as nobody, as upstream does."""
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(
        getattr(grp.getgrnam("nogroup"), "gr_gid", nobody.pw_gid)
        if _has_group("nogroup")
        else nobody.pw_gid
    )
    os.setuid(nobody.pw_uid)
    log.info("dropped privileges", extra={"uid": os.getuid(), "gid": os.getgid()})


def _preload() -> None:
    """Import now what would be imported lazily later: as nobody, the interpreter's own
    files may be out of reach (a Python installed under /root, say)."""
    import concurrent.futures.thread  # noqa: F401
    import email.feedparser  # noqa: F401
    import encodings.idna  # noqa: F401
    import http.client  # noqa: F401


SOCKET_REMOVER = """
import os, sys
path, inode = sys.argv[1], int(sys.argv[2])
sys.stdin.buffer.read()  # EOF: the forwarder has exited, however it ended
try:
    if os.lstat(path).st_ino == inode:
        os.unlink(path)
except OSError:
    pass
"""


def remove_socket_at_exit(address: str) -> subprocess.Popen[bytes] | None:
    """Before dropping privileges: a root helper that removes the socket file when we exit.

    As nobody we may not write the directory the socket is in (a VMM's run
    directory); the helper only waits for our end and then removes the file,
    if it is still ours.
    """
    parsed = as_address(address)
    if not isinstance(parsed, UnixAddress | HybridVsockAddress):
        return None
    path = parsed.listen_path if isinstance(parsed, HybridVsockAddress) else parsed.path
    return subprocess.Popen(
        [sys.executable, "-I", "-c", SOCKET_REMOVER, path, str(os.lstat(path).st_ino)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()  # handlers first: a SIGTERM during start-up stops us cleanly
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sink = make_sink(args)
    queue = Queue(sink, max_bytes=args.queue_bytes)
    address = listen_address(args)
    receiving = Receiving(
        Limits(
            max_record=args.max_record,
            receive_limit=args.receive_bytes,
            max_connections=args.max_connections,
        )
    )
    listener = await listen(address, queue.submit, args.trace_name, receiving)
    remover = None
    if os.geteuid() == 0:
        remover = remove_socket_at_exit(address)
        await asyncio.to_thread(_preload)  # also starts the thread pool, while we may
        drop_privileges()
    queue.start()
    log.info("forwarding", extra={"listen": address, "to": sink.name})
    try:
        await stop.wait()
        listener.close()
        await receiving.settle()
        await queue.drain(timeout=5.0)
    finally:
        if remover is not None:
            remover.communicate(timeout=5.0)  # closes its stdin: it removes the socket file
    log.info(
        "stopped",
        extra={
            "delivered_spans": queue.delivered_spans,
            "dropped_spans": queue.dropped_spans,
            "dropped_records": receiving.dropped_records,
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    writer = logsetup.setup(LEVELS[args.log_level], name="kata-trace-forwarder", source="forwarder")
    logsetup.install_hooks()
    writer.start()  # a console that stalls must not stall the forwarding
    try:
        return asyncio.run(serve(args))
    except (AddressError, TransportError, OSError) as exc:
        print(f"kata-trace-forwarder: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
