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
from ..clihelp import Formatter
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


#: Upstream's options before it moved to OTLP, and the Jaeger port it sent to:
#: Jaeger's agent port for Thrift over UDP, which takes no OTLP.
JAEGER_DEFAULT_HOST = "127.0.0.1"
JAEGER_THRIFT_PORT = 6831
#: Where Jaeger (1.35 and later) and collectors take OTLP over gRPC.
OTLP_GRPC_PORT = 4317
DEFAULT_ENDPOINT = f"http://localhost:{OTLP_GRPC_PORT}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-trace-forwarder",
        epilog=EPILOG,
        formatter_class=Formatter,
        description="Forward the Kata agent's spans (OTLP records over vsock, hybrid vsock or "
        "a unix socket) to an OpenTelemetry collector or a file.",
    )
    p.add_argument("--version", action="version", version=f"kata-trace-forwarder {__version__}")
    p.add_argument(
        "-l",
        "--log-level",
        choices=[*LEVELS, "warning"],
        default="info",
        metavar="LEVEL",
        help="the forwarder's own JSON log lines on stderr: critical, error, warn (warning), "
        "info, debug or trace",
    )
    p.add_argument(
        "--trace-name",
        default="kata-agent",
        metavar="NAME",
        help="service.name given to the agent's spans (those without one of their own)",
    )
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help=f"the collector (default: {DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--otlp-protocol",
        choices=["grpc", "http"],
        default="grpc",
        help="OTLP over gRPC (TraceService/Export) or HTTP (POST protobuf to /v1/traces)",
    )
    p.add_argument(
        "--jaeger-host",
        metavar="HOST",
        help="deprecated, as upstream: the collector is http://HOST:4317 (OTLP); use "
        "--otlp-endpoint (default: not used)",
    )
    p.add_argument(
        "--jaeger-port",
        type=port,
        metavar="PORT",
        help=f"deprecated, as upstream: with --jaeger-host, the port; {JAEGER_THRIFT_PORT} "
        f"(Jaeger's Thrift port, upstream's old default) means {OTLP_GRPC_PORT} "
        "(default: not used)",
    )
    p.add_argument(
        "--socket-path",
        metavar="PATH",
        help="hybrid vsock (Cloud Hypervisor, Firecracker): the VMM's socket; listens on "
        "PATH_PORT (default: standard vsock)",
    )
    p.add_argument(
        "--vsock-cid",
        type=vsock_cid,
        default=-1,
        metavar="CID",
        help="vsock CID to listen on: a number, or any (default: any)",
    )
    p.add_argument(
        "--vsock-port", type=port, default=10240, metavar="PORT", help="vsock port to listen on"
    )
    p.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="listen on any transport address instead (unix:///..., unix://@...) "
        "(default: vsock, as above)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write OTLP JSON lines to FILE ('-': stdout) instead of a collector "
        "(default: to the collector)",
    )
    p.add_argument("--dump-only", action="store_true", help="print spans instead of exporting them")
    limits = Limits()
    p.add_argument(
        "--queue-bytes",
        type=size,
        default=64 << 20,
        metavar="SIZE",
        help="spans held for the collector, in bytes of OTLP (default: 64M); past it new "
        "spans are dropped and counted",
    )
    p.add_argument(
        "--max-record",
        type=size,
        default=MAX_RECORD,
        metavar="SIZE",
        help="largest record accepted from an agent (default: 4M); larger ones are skipped unread",
    )
    p.add_argument(
        "--receive-bytes",
        type=size,
        default=limits.receive_limit,
        metavar="SIZE",
        help="bytes of records being received, all connections together (default: 32M)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=limits.max_connections,
        metavar="N",
        help="agent connections at once",
    )
    return p


def vsock_cid(text: str) -> int:
    """A CID to listen on: a number, or `any` (upstream's word for VMADDR_CID_ANY)."""
    if text == "any":
        return -1
    try:
        cid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CID (a number, or any)") from None
    if cid == 0xFFFFFFFF:
        return -1
    if not -1 <= cid < 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CID (a number, or any)")
    return cid


def size(text: str) -> int:
    """A byte count: 4096, 64K, 4M, 1G (binary units)."""
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (4096, 64K, 4M, 1G)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def port(text: str) -> int:
    """A port number: 1 to 4294967295 (vsock ports are 32-bit), as upstream checks it."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    number = int(text)
    if not 0 < number <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: a port number is 1 to 4294967295")
    return number


def listen_address(args: argparse.Namespace) -> str:
    if args.listen:
        return str(args.listen)
    if args.socket_path:
        return str(HybridVsockAddress(args.socket_path, args.vsock_port))
    return str(VsockAddress(args.vsock_cid, args.vsock_port))


class UsageError(Exception):
    """A command line the forwarder cannot act on: one line, exit status 2."""


def endpoint(args: argparse.Namespace) -> str:
    """The collector: --otlp-endpoint, or the deprecated Jaeger options mapped to OTLP."""
    if args.jaeger_host is None and args.jaeger_port is None:
        value = DEFAULT_ENDPOINT if args.otlp_endpoint is None else args.otlp_endpoint
        if not value.strip():
            raise UsageError("--otlp-endpoint cannot be blank")
        return str(value)
    if args.otlp_endpoint is not None:
        raise UsageError("give --otlp-endpoint, or the deprecated --jaeger-host/--jaeger-port")
    host = args.jaeger_host if args.jaeger_host is not None else JAEGER_DEFAULT_HOST
    if not host.strip():
        raise UsageError("--jaeger-host cannot be blank")
    given = args.jaeger_port
    chosen = OTLP_GRPC_PORT if given in (None, JAEGER_THRIFT_PORT) else given
    url = f"http://{f'[{host}]' if ':' in host else host}:{chosen}"
    log.warning(
        f"--jaeger-host and --jaeger-port are deprecated (upstream replaced them with "
        f"--otlp-endpoint); sending OTLP to {url}: use --otlp-endpoint {url}",
        extra={"otlp_endpoint": url},
    )
    return url


def make_sink(args: argparse.Namespace) -> Sink:
    if args.dump_only:
        return DumpSink()
    if args.output:
        if args.output == "-":
            return FileSink(sys.stdout, "stdout")
        try:
            return FileSink(open(args.output, "a", encoding="utf-8"), args.output)
        except OSError as exc:
            raise OSError(f"cannot write {args.output}: {exc.strerror}") from None
    if args.otlp_protocol == "http":
        return HttpSink(args.endpoint)
    return GrpcSink(args.endpoint)


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
        # Out of our process group: a Ctrl-C at the terminal is for us, not for it.
        start_new_session=True,
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
    level = LEVELS["warn" if args.log_level == "warning" else args.log_level]
    writer = logsetup.setup(level, name="kata-trace-forwarder", source="forwarder")
    logsetup.install_hooks()
    writer.start()  # a console that stalls must not stall the forwarding
    try:
        check(args)
    except UsageError as exc:
        print(f"kata-trace-forwarder: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args))
    except (AddressError, TransportError, OSError) as exc:
        print(f"kata-trace-forwarder: {exc}", file=sys.stderr)
        return 1


def check(args: argparse.Namespace) -> None:
    """What argparse cannot check: blank values, the address, the collector."""
    if not args.trace_name.strip():
        raise UsageError("--trace-name cannot be blank (upstream: need non-blank trace name)")
    if args.socket_path is not None and not args.socket_path:
        raise UsageError("--socket-path cannot be blank")
    if args.listen and (args.socket_path or args.vsock_cid != -1):
        raise UsageError("--listen replaces --socket-path and --vsock-cid: give one of them")
    try:
        as_address(listen_address(args))
    except AddressError as exc:
        raise UsageError(f"--listen: {exc}") from None
    args.endpoint = endpoint(args)


if __name__ == "__main__":
    sys.exit(main())
