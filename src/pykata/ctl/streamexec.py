"""kata-agent-ctl exec: a command in a running container over one Exec stream,
scripted (pipes) or interactive (a terminal), exiting with its status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import termios
from collections.abc import Awaitable, Callable

from ..api import oci_pb2
from ..extensions.client import Extensions
from ..extensions.streamexec import ExecSession
from . import terminal
from .run import read_stdin

STDIN, STDOUT, STDERR = 0, 1, 2
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

EXEC_EPILOG = """\
Without -i the command's stdin is empty; with -t it gets a terminal (its
stdout and stderr are then one stream), with the local window's size, kept
up to date. The tool exits with the command's status (128+N for signal N).
Ctrl-C with -t is a key for the command; otherwise it sends SIGINT to it.

examples:
  kata-agent-ctl exec unix:///tmp/kata-agent.sock c1 -- ls -l /
  kata-agent-ctl exec -it unix:///tmp/kata-agent.sock c1 -- /bin/sh
  tar c . | kata-agent-ctl exec -i unix:///tmp/kata-agent.sock c1 -- tar x -C /srv
  kata-agent-ctl exec -e DEBUG=1 -w /tmp vsock://3:1024 c1 -- env
"""


def add_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    command_parser: Callable[..., argparse.ArgumentParser],
) -> None:
    """`command_parser`: extensions.command_parser (the address options and the rest)."""
    parser = command_parser(
        sub,
        "exec",
        help="run a command in a container, its I/O streamed (Exec)",
        description="Run a command in a running container, its stdin, stdout, stderr and "
        "exit status on one stream.",
        epilog=EXEC_EPILOG,
    )
    parser.add_argument("container", metavar="CONTAINER", help="the container's id")
    parser.add_argument("args", nargs="+", metavar="COMMAND", help="the command and its arguments")
    parser.add_argument("-i", "--interactive", action="store_true", help="pass our stdin on")
    parser.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    parser.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable (again for more; default: PATH only)",
    )
    parser.add_argument("-w", "--workdir", default="/", metavar="DIR", help="working directory")
    parser.add_argument("-u", "--user", default="0:0", metavar="UID[:GID]", help="user to run as")
    parser.add_argument(
        "--exec-id", default="", metavar="ID", help="the exec's id (default: made up)"
    )


def process_of(args: argparse.Namespace) -> oci_pb2.Process:
    uid, _, gid = args.user.partition(":")
    try:
        user = oci_pb2.User(UID=int(uid), GID=int(gid or 0))
    except ValueError:
        raise ValueError(f"--user {args.user!r}: give UID or UID:GID (numbers)") from None
    env = DEFAULT_ENV + [e for e in args.env if not e.startswith("PATH=")]
    if any(e.startswith("PATH=") for e in args.env):
        env = args.env
    return oci_pb2.Process(Args=args.args, Terminal=args.tty, Cwd=args.workdir, Env=env, User=user)


def command(args: argparse.Namespace) -> Callable[[Extensions], Awaitable[int]]:
    process = process_of(args)

    async def run(extensions: Extensions) -> int:
        session = await ExecSession.start(extensions, args.container, process, args.exec_id)
        return await _interact(session, interactive=args.interactive, tty=args.tty)

    return run


async def _interact(session: ExecSession, *, interactive: bool, tty: bool) -> int:
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        if tty:
            if interactive:
                stack.enter_context(terminal.raw(STDIN))
            stack.enter_context(terminal.untouched_output(STDOUT))
            window = terminal.first_size(STDOUT, STDIN)
            if window is not None:
                session.resize(*window)

            def resized() -> None:
                size = terminal.first_size(STDOUT, STDIN)
                if size is not None:
                    session.resize(*size)

            loop.add_signal_handler(signal.SIGWINCH, resized)
            stack.callback(loop.remove_signal_handler, signal.SIGWINCH)
        if not tty:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, session.signal, signum)
                stack.callback(loop.remove_signal_handler, signum)
        feeding = asyncio.ensure_future(_feed(session) if interactive else _no_stdin(session))
        try:
            async for stream, data in session.output():
                _write_all(STDOUT if stream == "stdout" else STDERR, data)
        finally:
            feeding.cancel()
            with contextlib.suppress(BaseException):
                await feeding
        if tty and os.isatty(STDIN):
            with contextlib.suppress(OSError):
                termios.tcflush(STDIN, termios.TCIFLUSH)
    status = session.exit_status
    assert status is not None
    return status


async def _feed(session: ExecSession) -> None:
    async for chunk in read_stdin():
        await session.write(chunk)
    session.close_stdin()


async def _no_stdin(session: ExecSession) -> None:
    session.close_stdin()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # a non-blocking stdout that is full: wait for room
            select.select([], [fd], [])
            continue
        view = view[written:]
