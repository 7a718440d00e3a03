"""The guest most VM tests use: tests/test_vm.py and tests/test_vm_snapshot.py restore
it from one snapshot (the `guest_snapshot` fixture in conftest.py, made once per image)."""

from __future__ import annotations

from pykata.vm import image as image_mod
from pykata.vm import qemu


def guest_options(guest_image: image_mod.GuestImage, **given: object) -> qemu.VmOptions:
    """Two CPUs of which one is offline, a debug console, tracing: the guest most VM tests
    use, restored from one snapshot (tests/test_vm_snapshot.py restores the same one)."""
    shape: dict[str, object] = {
        "accel": "tcg",
        "cpus": 2,
        "kernel_params": "maxcpus=1",
        "debug_console": True,
        "trace_socket": "/nonexistent/trace.sock",  # each restore names its own
    }
    return qemu.VmOptions(image=guest_image, **{**shape, **given})  # type: ignore[arg-type]
