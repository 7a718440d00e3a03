"""The guest VM: image build, launch to the first answered Check, the agent's memory
in the guest, and a few calls over the virtio-serial channel.

    python bench/vm.py      # prints JSON results
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pykata.vm import image as image_mod  # noqa: E402
from pykata.vm import qemu  # noqa: E402
from tracing import check_latencies  # noqa: E402

BOOTS = 3
CHECKS = 200
CTL = [sys.executable, "-m", "pykata.ctl.cli"]
MEM_USED_KB = "awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {print t-a}' /proc/meminfo"


def in_guest(vm: qemu.Vm, command: str) -> str:
    done = subprocess.run(
        [*CTL, "console", vm.console_address, "-c", command, "--timeout", "60"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def agent_startup_ms(console: str) -> float:
    """From the agent's start to serving, as it logs it on the guest console."""
    for line in console.splitlines():
        if '"agent serving"' in line:
            return float(json.loads(line[line.index("{") :])["startup_ms"])
    raise ValueError("no 'agent serving' line on the guest console")


def measure() -> dict[str, Any]:
    image_mod.build(quiet=True)  # up to date first, so the next one only checks
    started = time.monotonic()
    guest = image_mod.build(quiet=True)
    cached_build_s = time.monotonic() - started
    started = time.monotonic()
    guest = image_mod.build(rebuild=True, quiet=True)
    image_build_s = time.monotonic() - started
    sizes = {
        "kernel_mb": guest.kernel.stat().st_size / 1e6,
        "initramfs_mb": guest.initramfs.stat().st_size / 1e6,
        "root_disk_mb": guest.root_disk.stat().st_size / 1e6,
        "root_disk_used_mb": guest.root_disk.stat().st_blocks * 512 / 1e6,
    }
    boots: list[float] = []
    result: dict[str, Any] = {}
    for n in range(BOOTS):
        with tempfile.TemporaryDirectory() as tmp:
            options = qemu.VmOptions(
                image=guest, accel="tcg", debug_console=n == 0, run_dir=Path(tmp)
            )
            with qemu.launched(options) as vm:
                boots.append(vm.ready_after)
                if n == 0:
                    rss = in_guest(vm, "grep VmRSS /proc/1/status").split()[1]
                    result["agent_rss_mb"] = int(rss) / 1024
                    result["guest_mem_used_mb"] = int(in_guest(vm, MEM_USED_KB)) / 1024
                    samples = asyncio.run(check_latencies(vm.agent_address, CHECKS))
                    result["check_ms"] = statistics.median(samples) * 1e3
                    uptime = float(in_guest(vm, "cut -d' ' -f1 /proc/uptime"))
                    since_ready = time.monotonic() - (vm.launched_at + vm.ready_after)
                    result["guest_uptime_at_ready_s"] = uptime - since_ready
                    result["agent_startup_ms"] = agent_startup_ms(vm.console_log.read_text())
                stopping = time.monotonic()
                result.setdefault("stop_s", []).append(
                    (qemu.stop(vm), round(time.monotonic() - stopping, 2))
                )
    accel_started = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as tmp,
        qemu.launched(qemu.VmOptions(image=guest, run_dir=Path(tmp))) as vm,
    ):
        auto = {"accel": vm.accel, "reason": vm.accel_reason, "ready_s": vm.ready_after}
    auto["total_s"] = time.monotonic() - accel_started
    return {
        **result,
        **sizes,
        "cached_build_s": cached_build_s,
        "image_build_s": image_build_s,
        "launch_to_check_s": boots,
        "launch_to_check_median_s": statistics.median(boots),
        "auto": auto,
        "manifest": guest.manifest,
    }


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
