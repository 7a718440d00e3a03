"""Runtime invocations and the orphan sweep, against a real crun and real child processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pykata.agent.errors import RuntimeFailure
from pykata.agent.reaper import Orphans
from pykata.agent.runtime import OciRuntime

CRUN = shutil.which("crun")


@pytest.mark.skipif(CRUN is None, reason="crun is not installed")
async def test_a_failing_runtime_command_says_why_and_leaves_no_files(tmp_path: Path) -> None:
    runtime = OciRuntime(str(CRUN), tmp_path / "state")
    for _ in range(3):  # every invocation its own log: no earlier error is reported again
        with pytest.raises(RuntimeFailure) as failure:
            await runtime.start("no-such-container")
        assert failure.value.message.startswith("crun start failed: ")
        assert "no-such-container" in failure.value.message
    assert list((tmp_path / "state").iterdir()) == []


def _wait_until_zombie(pid: int) -> None:
    for _ in range(500):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} never exited")


def test_the_sweep_reaps_unknown_exited_children_and_leaves_watched_ones() -> None:
    orphans = Orphans()
    assert orphans.sweep() == []  # nothing exited: nothing to do
    watched = subprocess.Popen(["true"])
    orphan = subprocess.Popen(["true"])
    orphans.watched.add(watched.pid)
    _wait_until_zombie(watched.pid)
    _wait_until_zombie(orphan.pid)
    assert orphans.sweep() == [orphan.pid]
    assert not Path(f"/proc/{orphan.pid}").exists()  # reaped
    assert os.waitpid(watched.pid, 0)[0] == watched.pid  # still ours to collect
    orphan.returncode = watched.returncode = 0  # collected above: Popen must not wait again
