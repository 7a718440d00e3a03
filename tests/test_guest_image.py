"""The image builder's Kata initrd step, on a small root tree (no debootstrap, no VM).

The real initrd is booted in tests/test_kata_initrd.py; here: what goes into the
archive, and that a build that cannot be right fails saying why.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from pykata.vm import image

RELEASE = "6.1.0-test"


def small_root(path: Path, drivers: tuple[str, ...] = image.KATA_DRIVERS) -> Path:
    """A root tree with the agent's script, a module for each driver, and modules.dep."""
    modules = path / "lib" / "modules" / RELEASE
    modules.mkdir(parents=True)
    (modules / "kernel").mkdir()
    lines = []
    for name in drivers:
        (modules / "kernel" / f"{name}.ko").write_bytes(b"\x7fELF" + name.encode())
        lines.append(f"kernel/{name}.ko:\n")
    (modules / "modules.dep").write_text("".join(lines))
    agent = path / "usr" / "local" / "bin" / "kata-agent"
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/usr/bin/python3\n")
    agent.chmod(0o755)
    (path / "dev").mkdir()
    os.mknod(path / "dev" / "console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    path.chmod(0o755)
    return path


def unpack(initrd: Path, into: Path) -> str:
    """Extract the compressed archive into `into`; its verbose listing."""
    raw = subprocess.run(["zstd", "-dc", str(initrd)], capture_output=True, check=True).stdout
    listing = subprocess.run(
        ["cpio", "-tv", "--quiet"], input=raw, capture_output=True, check=True
    ).stdout.decode()
    into.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet"], input=raw, cwd=into, check=True)
    return listing


def test_the_whole_root_with_an_init_that_becomes_the_agent(tmp_path: Path) -> None:
    root = small_root(tmp_path / "root")
    image.make_kata_initrd(root, tmp_path / "kata-initrd.img")
    listing = unpack(tmp_path / "kata-initrd.img", tmp_path / "out")
    out = tmp_path / "out"
    init = out / "init"
    assert init.stat().st_mode & 0o777 == 0o755
    script = init.read_text()
    assert script.startswith("#!/bin/sh\n")
    # Every driver of Kata's devices is loaded, before the agent takes over as PID 1.
    modprobe = next(line for line in script.splitlines() if line.startswith("modprobe"))
    assert modprobe.split()[3:] == list(image.KATA_DRIVERS)
    assert script.rstrip().endswith("exec /usr/local/bin/kata-agent")
    # The rest of the tree came along, owned by root, the console node included.
    assert (out / "usr/local/bin/kata-agent").read_text() == "#!/usr/bin/python3\n"
    assert (out / "lib/modules" / RELEASE / "kernel/virtio_pci.ko").exists()
    console = next(line for line in listing.splitlines() if line.endswith(" dev/console"))
    assert console.startswith("crw") and " root " in console
    assert all(" root " in line for line in listing.splitlines() if line), listing
    root_entry = next(line for line in listing.splitlines() if line.endswith(" ."))
    assert root_entry.startswith("drwxr-xr-x"), root_entry  # / is not private


def test_a_kernel_without_a_driver_kata_needs_is_refused(tmp_path: Path) -> None:
    root = small_root(tmp_path / "root", drivers=image.KATA_DRIVERS[:-1])
    missing = image.KATA_DRIVERS[-1]
    with pytest.raises(image.ImageError, match=f"kernel module {missing} not found"):
        image.make_kata_initrd(root, tmp_path / "kata-initrd.img")


def test_a_failing_compressor_fails_the_build(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "file").write_text("data\n")
    with pytest.raises(image.ImageError, match=r"false failed \(exit 1\)"):
        image.write_cpio(stage, tmp_path / "out.img", ("false",))


def test_a_pinned_image_wins_over_current_which_another_build_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("image-mine", "image-theirs"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / "current").symlink_to("image-theirs")
    monkeypatch.setenv(image.DEFAULT_DIR_ENV, str(tmp_path))
    assert image.current().directory.name == "image-theirs"
    monkeypatch.setenv(image.IMAGE_ENV, str(tmp_path / "image-mine"))
    assert image.current().directory.name == "image-mine"
    # An explicit directory (kata-agent-ctl --guest-dir) still means that directory's newest.
    assert image.current(tmp_path).directory.name == "image-theirs"
    monkeypatch.setenv(image.IMAGE_ENV, str(tmp_path / "gone"))
    with pytest.raises(image.ImageError, match=r"PYKATA_GUEST_IMAGE names .*gone"):
        image.current()
