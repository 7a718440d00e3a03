"""Guests restored from a snapshot against cold-booted ones, in the same run: launch
to the first answered Check, a container's first output, and host memory (PSS) of
1, 4 and 8 guests at once.

    python bench/snapshot.py      # prints JSON results
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pykata.vm import image as image_mod  # noqa: E402
from pykata.vm import qemu, snapshot  # noqa: E402

CTL = [sys.executable, "-m", "pykata.ctl.cli"]
COLD_BOOTS = 3
RESTORES = 11
FIRST_OUTPUTS = 3
GUEST_COUNTS = (1, 4, 8)


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages count divided among the processes mapping them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no Pss for {pid}")


def spread(samples: list[float]) -> dict[str, Any]:
    return {
        "samples": [round(s, 3) for s in samples],
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
    }


def guest(
    options: qemu.VmOptions, saved: snapshot.Snapshot | None
) -> AbstractContextManager[qemu.Vm]:
    return snapshot.restored(options, saved) if saved else qemu.launched(options)


def first_checks(
    options: qemu.VmOptions,
    saved: snapshot.Snapshot | None,
    count: int,
    steps: list[dict[str, float]] | None = None,
) -> list[float]:
    times = []
    for _ in range(count):
        with guest(options, saved) as vm:
            times.append(vm.ready_after)
            if steps is not None:
                steps.append({**vm.restore_steps, "check": vm.ready_after})
    return times


def step_medians(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds of each restore step after the one before (vm.restore_steps)."""
    names = ["monitor", "running", "restored", "check"]
    spans: dict[str, list[float]] = {name: [] for name in names}
    for row in steps:
        before = 0.0
        for name in names:
            spans[name].append(row[name] - before)
            before = row[name]
    return {name: statistics.median(values) for name, values in spans.items()}


def private_mb(pid: int) -> dict[str, float]:
    """A QEMU's own (private, written) memory by what holds it: the guest's pages it
    wrote (its copies of the snapshot's memory file), and QEMU's anonymous memory -
    translated code and its other structures - and heap."""
    parts = {"guest pages": 0, "anonymous": 0, "heap": 0}
    kind = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's first line
            name = fields[5] if len(fields) > 5 else ""
            kind = ("guest pages" if name.endswith("/memory") else "heap" if name == "[heap]"
                    else "anonymous" if not name else None)  # fmt: skip
        elif fields[0] == "Private_Dirty:" and kind is not None:
            parts[kind] += int(fields[1])
    return {k: v / 1024 for k, v in parts.items()}


def first_output_s(saved: snapshot.Snapshot | None) -> float:
    """From starting `kata-agent-ctl connect --vm qemu` to the container's first line."""
    restore = ["--from-snapshot", str(saved.directory)] if saved else []
    started = time.monotonic()
    with subprocess.Popen(
        [*CTL, "connect", "--vm", "qemu", "--accel", "tcg", *restore,
         "-c", "run /bin/echo first output"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    ) as ctl:  # fmt: skip
        assert ctl.stdout is not None
        for line in ctl.stdout:
            if "first output" in line:
                took = time.monotonic() - started
                break
        else:
            raise RuntimeError(f"no container output: {ctl.stderr.read() if ctl.stderr else ''}")
        ctl.communicate(timeout=120)
    return took


def memory(
    options: qemu.VmOptions, saved: snapshot.Snapshot | None
) -> tuple[dict[int, float], dict[str, float]]:
    """Total PSS of the QEMU processes with 1, 4 and 8 guests up (each idle, agent
    served), and the last guest's private memory by part."""
    totals: dict[int, float] = {}
    with ExitStack() as stack:
        vms: list[qemu.Vm] = []
        while len(vms) < max(GUEST_COUNTS):
            vms.append(stack.enter_context(guest(options, saved)))
            if len(vms) in GUEST_COUNTS:
                time.sleep(2)  # let the newest settle
                totals[len(vms)] = sum(pss_mb(vm.process.pid) for vm in vms)
        return totals, private_mb(vms[-1].process.pid)


def measure() -> dict[str, Any]:
    image = image_mod.build(quiet=True)
    options = qemu.VmOptions(image=image, accel="tcg", boot_timeout=600)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        saved = snapshot.ensure(options, Path(tmp) / "snapshot")
        make_s = time.monotonic() - started
        cold = first_checks(options, None, COLD_BOOTS)
        steps: list[dict[str, float]] = []
        warm = first_checks(options, saved, RESTORES, steps)
        outputs: dict[str, list[float]] = {"cold": [], "snapshot": []}
        for _ in range(FIRST_OUTPUTS):  # alternating, so a slow spell hits both alike
            outputs["cold"].append(first_output_s(None))
            outputs["snapshot"].append(first_output_s(saved))
        sizes = {
            "memory_file_mb": saved.memory.stat().st_blocks * 512 / 1e6,
            "state_mb": saved.state.stat().st_size / 1e6,
            "disk_mb": saved.disk.stat().st_blocks * 512 / 1e6,
        }
        pss_restored, private_restored = memory(options, saved)
        pss_cold, _ = memory(options, None)
    return {
        "snapshot_make_s": make_s,
        "first_check_cold_s": spread(cold),
        "first_check_snapshot_s": spread(warm),
        "first_output_cold_s": spread(outputs["cold"]),
        "first_output_snapshot_s": spread(outputs["snapshot"]),
        "restore_steps_s": step_medians(steps),
        "private_restored_mb": private_restored,
        "pss_restored_mb": pss_restored,
        "pss_cold_mb": pss_cold,
        **sizes,
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
