"""Running the guest's helper programs (mount, mkswap, resize2fs, iptables-restore...)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

from .errors import FailedPrecondition
from .reaper import orphans


async def run(*command: str, stdin: bytes | None = None) -> bytes:
    """Run `command` to its end; its stdout, or FailedPrecondition with its stderr.

    The orphan sweeper holds off meanwhile: the child's exit status is the event
    loop's to collect, and a sweep reaping it first would leave this call waiting
    forever (it once hung AddSwapPath's swapon in the guest).
    """
    if shutil.which(command[0]) is None:
        raise FailedPrecondition(f"{command[0]} is not installed")
    with orphans.runtime_running():
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin)
    if proc.returncode:
        raise FailedPrecondition(f"{' '.join(command)} failed: {err.decode().strip()}")
    return out
