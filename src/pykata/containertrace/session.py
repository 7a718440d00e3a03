"""An LTTng session that is always destroyed: by us, or by a guard process
when we die before we can (a killed recorder must not leave a session
filling memory and disk, nor its helper processes running).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

log = logging.getLogger("pykata.containertrace")

#: The agent's Python logger, as LTTng's Python domain sees it.
AGENT_LOGGER = "pykata"
#: Context fields every userspace event carries (pid_ns ties it to a container).
CONTEXTS = ("vpid", "vtid", "procname", "pid_ns")
MI = "{https://lttng.org/xml/ns/lttng-mi}"  # lttng --mi xml


class LttngError(RuntimeError):
    """An lttng command failed; the message is its own."""


def lttng(*args: str) -> str:
    if shutil.which("lttng") is None:
        raise LttngError("lttng is not installed (Debian package lttng-tools)")
    done = subprocess.run(["lttng", *args], capture_output=True, text=True)
    if done.returncode:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise LttngError(f"lttng {' '.join(args)}: {message[-1] if message else 'failed'}")
    return done.stdout


def sessions() -> list[str]:
    """Names of the sessions the session daemon holds (none if it is not running)."""
    done = subprocess.run(["lttng", "--mi", "xml", "list"], capture_output=True, text=True)
    if done.returncode or not done.stdout.strip():
        return []
    root = ElementTree.fromstring(done.stdout)
    return [s.findtext(f"{MI}name", "") for s in root.iter(f"{MI}session")]


def ensure_session_daemon() -> None:
    if subprocess.run(["pgrep", "-x", "lttng-sessiond"], capture_output=True).returncode == 0:
        return
    subprocess.run(["lttng-sessiond", "--daemonize"], check=True, capture_output=True)
    log.info("started lttng-sessiond")


def kernel_tracing() -> str | None:
    """None when kernel tracing works, else why not (one line)."""
    try:
        lttng("list", "--kernel")
    except LttngError as exc:
        return str(exc).rpartition(": ")[2] or "kernel tracer not available"
    return None


class Guard:
    """A process that cleans up if we die without doing so (see guard.py)."""

    def __init__(self, session: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pykata.containertrace.guard", session],
            stdin=subprocess.PIPE,
            text=True,
            cwd="/",  # `-m` puts the working directory on sys.path
            start_new_session=True,  # a Ctrl-C to our group must not stop it first
        )

    def watch(self, pid: int) -> None:
        """A helper process to stop should we die."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"pid {pid}\n")
        self._proc.stdin.flush()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        # Reached whenever we unwind: our own clean-up has run, the guard may go.
        assert self._proc.stdin is not None
        self._proc.stdin.write("clean\n")
        self._proc.stdin.close()
        self._proc.wait()


@contextlib.contextmanager
def recording(name: str, output: Path, *, kernel: bool) -> Iterator[None]:
    """Record userspace events (and kernel ones if `kernel`) into `output`."""
    ensure_session_daemon()
    lttng("create", name, f"--output={output}")
    try:
        lttng("enable-event", "--session", name, "--userspace", "--all")
        lttng("enable-event", "--session", name, "--python", AGENT_LOGGER)
        contexts = [arg for c in CONTEXTS for arg in ("-t", c)]
        lttng("add-context", "--session", name, "--userspace", *contexts)
        if kernel:
            lttng("enable-event", "--session", name, "--kernel", "--all")
        lttng("start", name)
        yield
    finally:
        with contextlib.suppress(LttngError):
            lttng("stop", name)
        with contextlib.suppress(LttngError):
            lttng("destroy", name)
