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
from pykata.agent.runtime import LOG_DIR, LogFiles, OciRuntime

CRUN = shutil.which("crun")


@pytest.mark.skipif(CRUN is None, reason="crun is not installed")
async def test_a_failing_runtime_command_says_why_and_leaves_only_empty_logs(
    tmp_path: Path,
) -> None:
    runtime = OciRuntime(str(CRUN), tmp_path / "state")
    for n in range(3):  # the log is used again, emptied: no earlier error is reported again
        with pytest.raises(RuntimeFailure) as failure:
            await runtime.start(f"no-such-container-{n}")
        assert failure.value.message.startswith("crun start failed: ")
        assert f"no-such-container-{n}" in failure.value.message
        assert f"no-such-container-{n - 1}" not in failure.value.message
    # Nothing but the kept log, empty, where no container id can be.
    assert [p.name for p in (tmp_path / "state").iterdir()] == [LOG_DIR]
    logs = list((tmp_path / "state" / LOG_DIR).iterdir())
    assert len(logs) == 1 and logs[0].stat().st_size == 0


def test_log_files_are_kept_up_to_their_bound_and_emptied(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path / "logs", spare=2)
    taken = [logs.take() for _ in range(4)]  # four invocations at once
    for log_file in taken:
        os.write(log_file.fd, b'{"level":"error","msg":"old"}\n')  # as the runtime appends
        logs.give_back(log_file)
    kept = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert len(kept) == 2  # the bound: the other two were closed and removed
    again = logs.take()
    assert Path(again.path).name in kept and Path(again.path).stat().st_size == 0
    assert logs.take().path != again.path


def test_a_log_file_removed_under_the_agent_is_not_used_again(tmp_path: Path) -> None:
    logs = LogFiles(tmp_path / "logs")
    first = logs.take()
    os.unlink(first.path)
    Path(first.path).write_text("an error someone else's file holds\n")
    logs.give_back(first)  # the path no longer names the file taken: dropped
    assert not Path(first.path).exists()
    assert logs.take().path != first.path


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
