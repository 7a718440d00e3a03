"""Where the partial files of uploads are, so an agent that starts after one
died (kill -9, a crash) removes those it left.

A broken stream keeps its upload's partial file for a resume while the agent
runs. An agent that dies leaves them all, anywhere in containers'
filesystems, where nobody would find them. So each upload notes, before it
makes its partial file, which root it is in (the container's rootfs
directory, or the shared directory) and its path inside; the note goes when
the file does (committed, or refused). At start (leftovers.clean) every note
left is followed: the path resolved inside its root again (inroot.py: a
container that has made it a symlink meanwhile cannot lead us out), and the
file removed if it is still a partial file. A partial file in a mount of the
container's own (a tmpfs, a volume) is not under its rootfs: such a mount
goes with the container, which the new agent removes anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from .errors import AgentError
from .inroot import open_parent

log = logging.getLogger("pykata.agent.partials")

#: The notes' directory in the agent's run directory.
UPLOADS_DIR = "uploads"
#: The partial files' names begin with this (transfer.py).
PARTIAL_PREFIX = ".pykata-partial-"


class PartialNotes:
    """One note (a small JSON file) per partial file that may exist, in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _note(self, root: str, path: str) -> Path:
        key = hashlib.sha256(f"{root}\0{path}".encode(errors="surrogateescape")).hexdigest()
        return self.directory / key[:32]

    def record(self, root: str, path: str) -> None:
        """Before a partial file at `path` inside `root` is made."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        note = self._note(root, path)
        temporary = note.with_suffix(".new")
        temporary.write_text(json.dumps({"root": root, "path": path}))
        os.rename(temporary, note)

    def forget(self, root: str, path: str) -> None:
        """Once the partial file is gone (renamed into place, or removed)."""
        with contextlib.suppress(FileNotFoundError):
            self._note(root, path).unlink()

    def remove_left(self) -> int:
        """Remove the partial files a previous agent left; how many there were."""
        try:
            notes = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        removed = 0
        for note in notes:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AgentError):
                entry = json.loads(note.read_text())
                removed += _remove(str(entry["root"]), str(entry["path"]))
            note.unlink(missing_ok=True)
        if removed:
            log.warning("removed %d partial upload file(s) of a previous agent", removed)
        return removed


def _remove(root: str, path: str) -> int:
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent, name = open_parent(root_fd, path)
    finally:
        os.close(root_fd)
    try:
        if not name.startswith(PARTIAL_PREFIX):
            return 0
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return 0
        os.unlink(name, dir_fd=parent)
        return 1
    finally:
        os.close(parent)
