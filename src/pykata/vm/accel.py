"""Which accelerator a guest runs on: KVM when it works here, else software emulation.

KVM is tried when /dev/kvm opens and no earlier probe on this host boot found it
unusable; the probe is the guest's first console line within KVM_PROBE_SECONDS.
On these machines KVM enters the guest but the kernel stalls, so the verdict is
remembered per host boot (`kvm.json` in the image cache) instead of being paid
on every launch.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .image import GuestImage
from .machine import VmOptions

KVM_PROBE_SECONDS = 4.0
#: The kernel's first line on the serial console: proof the guest runs.
KERNEL_BANNER = b"Linux version"


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _kvm_verdict_file(image: GuestImage) -> Path:
    return image.directory.parent / "kvm.json"


def remembered_kvm_verdict(image: GuestImage) -> str | None:
    """Why KVM failed on this host boot, if a probe found so; None if not known."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        verdict = json.loads(_kvm_verdict_file(image).read_text())
        if verdict["boot_id"] == _boot_id():
            return str(verdict["failure"]) if verdict["failure"] else None
    return None


def remember_kvm_verdict(image: GuestImage, failure: str) -> None:
    with contextlib.suppress(OSError):
        _kvm_verdict_file(image).write_text(
            json.dumps({"boot_id": _boot_id(), "failure": failure}) + "\n"
        )


def kvm_unusable() -> str | None:
    """Why KVM cannot even be tried; None if /dev/kvm opens."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


def choose_accel(options: VmOptions) -> tuple[list[str], str]:
    """Accelerators to try in order, and why."""
    if options.accel == "tcg":
        return ["tcg"], "tcg (asked for)"
    if options.accel == "kvm":
        return ["kvm"], "kvm (asked for)"
    unusable = kvm_unusable() or remembered_kvm_verdict(options.image)
    if unusable:
        return ["tcg"], f"tcg (software emulation; KVM unusable here: {unusable})"
    return ["kvm", "tcg"], "kvm"


def probe_seconds(options: VmOptions) -> float:
    # Kata's guest is quiet until the agent speaks on hvc0, after the initrd is unpacked.
    return KVM_PROBE_SECONDS * (2 if options.layout == "kata-initrd" else 1)


def first_sign(options: VmOptions) -> bytes:
    """What the guest prints first when it runs: our kernel its banner on ttyS0; Kata's
    layout has only hvc0, where (quiet) the first line is the agent's JSON announce line."""
    return b"{" if options.layout == "kata-initrd" else KERNEL_BANNER
