"""The guest image: a kernel, a small initramfs of our own and a root disk with the agent.

    kata-guest-image [--output DIR] [--rebuild] [--kata-initrd]      (or: make guest-image)

Three parts, each cached under DIR by a key made of its inputs, so a rebuild
happens only when an input changes:

- base: a Debian root file system from debootstrap with python3, crun, runc,
  busybox-static, kmod, iproute2 and iptables (key: suite, mirror, packages);
- kernel: Debian's linux-image-cloud-amd64, downloaded and unpacked (key: the
  package's version);
- image: `vmlinuz`, `initramfs.cpio` (busybox, the virtio modules the root
  disk needs, an /init that mounts the disk and switches to the agent) and
  `root.img` (ext4: the base, the kernel's modules, pykata and its Python
  dependencies at the host's versions, and a busybox container rootfs at
  GUEST_ROOTFS). Key: the base, the kernel, pykata's sources and those versions.

`DIR/current` names the newest image; `manifest.json` in it says what it holds.
$PYKATA_GUEST_IMAGE, when set, names the image to use instead of `current`.

With --kata-initrd the image also gets `kata-initrd.img`: the same root file
system as one compressed initrd whose /init ends as the agent, for the real
Kata runtime's `initrd =` key together with `vmlinuz` (docs/kata-runtime.md).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pykata

from . import GUEST_ROOTFS

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "crun", "runc", "busybox-static", "kmod", "iproute2", "iptables")
KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: Modules the initramfs loads to reach the root disk (their dependencies come along).
ROOT_MODULES = ("virtio_pci", "virtio_blk")
#: pykata's own dependencies the guest does not need (the forwarder's gRPC exporter).
GUEST_SKIPS = {"grpcio"}
GUEST_EXTRAS = ("uvloop",)
#: Space left free on the root disk for containers' writes (it is a snapshot: never kept).
FREE_SPACE = 256 << 20
#: Bump when what the builder makes changes in a way its inputs do not show.
FORMAT = 1

DEFAULT_DIR_ENV = "PYKATA_GUEST_DIR"
#: One image directory to use instead of `current`: a test session pins the image it
#: built, so another checkout's build moving `current` cannot change it mid-run.
IMAGE_ENV = "PYKATA_GUEST_IMAGE"

INIT_SCRIPT = """#!/bin/busybox sh
# pykata initramfs: load the root disk's drivers, mount it, hand over to the agent.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
    insmod "/modules/$module" || echo "initramfs: insmod $module failed"
done
for _ in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.05; done
if ! mount -t ext4 /dev/vda /root; then
    echo "initramfs: cannot mount the root disk /dev/vda"; sleep 5; poweroff -f
fi
mount --move /dev /root/dev
umount /proc
exec switch_root /root /usr/local/bin/kata-agent
"""

#: Drivers of the devices Kata's runtime gives a guest: the virtio PCI bus, disks
#: (virtio-blk, virtio-scsi), network, console, virtio-fs, vsock, RNG, balloon,
#: virtio-mem, NVDIMM. Debian's kernel has them as modules, and Kata's guest runs
#: no udev, so the Kata initrd's /init loads them all before any device appears.
KATA_DRIVERS = (
    "virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "virtio_net", "virtio_console",
    "virtiofs", "vmw_vsock_virtio_transport", "virtio_rng", "virtio_balloon", "virtio_mem",
    "nd_pmem",
)  # fmt: skip

KATA_INIT_SCRIPT = f"""#!/bin/sh
# pykata's /init for Kata's initrd mode: this initrd is the whole root file system.
# Load the drivers of the devices Kata attaches, give the agent the console (hvc0
# exists once virtio_console has found its port) and become the agent: PID 1.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe -q -a {" ".join(KATA_DRIVERS)}
for _ in $(seq 1 40); do (: </dev/console) 2>/dev/null && break; sleep 0.05; done
if (: </dev/console) 2>/dev/null; then
    exec </dev/console >/dev/console 2>&1
else
    exec </dev/null >/dev/null 2>&1
fi
umount /proc
exec /usr/local/bin/kata-agent
"""
KATA_INITRD = "kata-initrd.img"
#: How the Kata initrd is compressed (the kernel unpacks it; see docs/kata-runtime.md).
KATA_INITRD_COMPRESS = ("zstd", "-q", "-3", "-T0")

AGENT_SCRIPT = """#!/usr/bin/python3
import sys

from pykata.agent.cli import main

sys.exit(main())
"""


class ImageError(RuntimeError):
    """A step of the build failed; the message says which and why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the files QEMU boots."""

    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio"

    @property
    def root_disk(self) -> Path:
        return self.directory / "root.img"

    @property
    def kata_initrd(self) -> Path:
        """The initrd for the real Kata runtime (with `kernel`); only if built with it."""
        return self.directory / KATA_INITRD

    @property
    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.directory / "manifest.json").read_text())
        return loaded

    def exists(self) -> bool:
        return (self.directory / "manifest.json").is_file()


def default_dir() -> Path:
    if os.environ.get(DEFAULT_DIR_ENV):
        return Path(os.environ[DEFAULT_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "pykata" / "guest"


def current(directory: Path | None = None) -> GuestImage:
    """The newest image built in `directory`, or the one $PYKATA_GUEST_IMAGE names."""
    pinned = os.environ.get(IMAGE_ENV)
    if pinned and directory is None:
        image = GuestImage(Path(pinned))
        if not image.exists():
            raise ImageError(f"${IMAGE_ENV} names {pinned}, which holds no guest image")
        return image
    directory = directory or default_dir()
    image = GuestImage((directory / "current").resolve())
    if not image.exists():
        raise ImageError(f"no guest image in {directory}: build one with `make guest-image`")
    return image


# --- helpers ------------------------------------------------------------------


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts], default=str).encode()).hexdigest()[:16]


def _run(*args: str, what: str, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip()
        raise ImageError(f"{what} failed ({args[0]} exit {result.returncode}): {detail[-2000:]}")
    return result.stdout.decode(errors="replace")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = Path(root, name)
            if not full.is_symlink():
                total += full.stat().st_size
    return total


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


class Progress:
    """One line per step, with its time: builds take minutes and should say so."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        if not self.quiet:
            print(f"guest-image: {what} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        yield
        if not self.quiet:
            print(
                f"guest-image: {what}: done in {time.monotonic() - started:.1f}s",
                file=sys.stderr,
                flush=True,
            )

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"guest-image: {text}", file=sys.stderr, flush=True)


@contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A work directory that becomes `final` only if the step completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield work
        try:
            os.rename(work, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another build made the same part meanwhile: same inputs, so keep theirs.
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


# --- base root file system ----------------------------------------------------

#: Left out of the root disk: package caches, documentation, translations.
PRUNE = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/locale", "usr/share/info")  # fmt: skip


def base(directory: Path, progress: Progress) -> Path:
    final = directory / f"base-{_key(SUITE, MIRROR, PACKAGES)}"
    if final.is_dir():
        return final
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (apt-get install debootstrap)")
    what = f"debootstrap {SUITE} with {', '.join(PACKAGES)} (about a minute)"
    with progress.step(what), _building(final) as work:
        _run(
            "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            SUITE, str(work), MIRROR, what="debootstrap",
        )  # fmt: skip
        for part in PRUNE:
            shutil.rmtree(work / part, ignore_errors=True)
    return final


# --- kernel -------------------------------------------------------------------


def kernel_package() -> tuple[str, str]:
    """The versioned kernel package linux-image-cloud-amd64 depends on, and its version."""
    depends = _run("apt-cache", "depends", KERNEL_PACKAGE, what="apt-cache depends")
    match = re.search(r"Depends: (linux-image-\S+)", depends)
    if match is None:
        raise ImageError(f"{KERNEL_PACKAGE} has no linux-image dependency: run apt-get update")
    name = match.group(1)
    policy = _run("apt-cache", "policy", name, what="apt-cache policy")
    version = re.search(r"Candidate: (\S+)", policy)
    if version is None or version.group(1) == "(none)":
        raise ImageError(f"no installable version of {name}: run apt-get update")
    return name, version.group(1)


def kernel(directory: Path, progress: Progress) -> Path:
    name, version = kernel_package()
    final = directory / f"kernel-{_key(name, version)}"
    if final.is_dir():
        return final
    with progress.step(f"download {name} {version}"), _building(final) as work:
        _run("apt-get", "download", "-o", "APT::Sandbox::User=root", f"{name}={version}",
             what="apt-get download", cwd=work)  # fmt: skip
        (deb,) = work.glob("*.deb")
        _run("dpkg-deb", "-x", str(deb), str(work / "tree"), what="dpkg-deb -x")
        deb.unlink()
        (work / "package").write_text(f"{name} {version}\n")
    return final


def kernel_release(kernel_dir: Path) -> str:
    (release,) = (p.name for p in (kernel_dir / "tree" / "lib" / "modules").iterdir())
    return release


# --- pykata and its dependencies ----------------------------------------------


def guest_requirements() -> list[str]:
    """pykata's runtime dependencies pinned at the versions installed here."""
    names = []
    for requirement in importlib.metadata.requires("pykata") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0]
        if name not in GUEST_SKIPS:
            names.append(name)
    names += GUEST_EXTRAS
    return sorted(f"{name}=={importlib.metadata.version(name)}" for name in names)


def package_files() -> list[Path]:
    root = Path(pykata.__file__).parent
    return sorted(
        p for p in root.rglob("*") if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    )


def sources_digest() -> str:
    root = Path(pykata.__file__).parent
    digest = hashlib.sha256()
    for path in package_files():
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def install_pykata(root: Path, requirements: Iterable[str]) -> None:
    """pykata and its dependencies where Debian's python3 finds them (/usr/local)."""
    (stdlib,) = (root / "usr" / "lib").glob("python3.*")
    site = root / "usr" / "local" / "lib" / stdlib.name / "dist-packages"
    _run(
        sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
        "--only-binary=:all:", "--target", str(site), *requirements,
        what="pip install (the agent's dependencies)",
    )  # fmt: skip
    package = Path(pykata.__file__).parent
    for path in package_files():
        target = site / "pykata" / path.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    # Bytecode now, not at every boot (the root disk is a snapshot, and compiling
    # under emulation is slow); the guest's python3 is the same minor version.
    _run(sys.executable, "-m", "compileall", "-q", str(site / "pykata"), what="compileall")
    script = root / "usr" / "local" / "bin" / "kata-agent"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(AGENT_SCRIPT)
    script.chmod(0o755)


def install_container_rootfs(root: Path) -> None:
    """A busybox rootfs for containers in the guest (the guest's own busybox-static)."""
    target = root / GUEST_ROOTFS.lstrip("/")
    for sub in ("bin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "bin" / "busybox", target / "bin" / "busybox")
    applets = _run("chroot", str(root), "/bin/busybox", "--list", what="busybox --list").split()
    for applet in applets:
        link = target / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (target / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (target / "etc" / "group").write_text("root:x:0:\n")


# --- initramfs and disk -------------------------------------------------------


def module_closure(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Module files (relative to modules_dir) for `wanted`, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in deps[path]:
            visit(dep)
        if path not in order:
            order.append(path)

    for name in wanted:
        if name not in by_name:
            raise ImageError(f"kernel module {name} not found (is it built in?)")
        visit(by_name[name])
    return order


def write_cpio(stage: Path, output: Path, compress: tuple[str, ...] = ()) -> None:
    """`stage` as a newc cpio archive owned by root, optionally piped through `compress`."""
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    listing = ("\n".join([".", *names]) + "\n").encode()
    cpio = ["cpio", "--quiet", "-o", "-H", "newc", "--reproducible", "-R", "0:0"]
    with open(output, "wb") as out:
        archiver = subprocess.Popen(
            cpio, cwd=stage, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
            stdout=subprocess.PIPE if compress else out,
        )  # fmt: skip
        compressor = None
        if compress:
            assert archiver.stdout is not None
            compressor = subprocess.Popen(
                compress, stdin=archiver.stdout, stdout=out, stderr=subprocess.PIPE
            )
            archiver.stdout.close()  # the compressor holds it now
        _, cpio_errors = archiver.communicate(listing)
        if compressor is not None:
            # Its failure first: cpio failing to write to it is only the consequence.
            _, errors = compressor.communicate()
            if compressor.returncode != 0:
                detail = errors.decode(errors="replace").strip()
                raise ImageError(f"{compress[0]} failed (exit {compressor.returncode}): {detail}")
        if archiver.returncode != 0:
            raise ImageError(f"cpio failed: {cpio_errors.decode(errors='replace').strip()}")


def make_initramfs(root: Path, release: str, output: Path) -> None:
    modules_dir = root / "lib" / "modules" / release
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for sub in ("bin", "proc", "dev", "root", "modules"):
            (stage / sub).mkdir()
        shutil.copy2(root / "bin" / "busybox", stage / "bin" / "busybox")
        order = module_closure(modules_dir, ROOT_MODULES)
        for module in order:
            shutil.copy2(modules_dir / module, stage / "modules" / Path(module).name)
        (stage / "modules.order").write_text("".join(Path(m).name + "\n" for m in order))
        init = stage / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        write_cpio(stage, output)


def make_kata_initrd(root: Path, output: Path) -> None:
    """The whole root file system as one initrd, for Kata's `initrd =` (adds /init to root)."""
    if shutil.which(KATA_INITRD_COMPRESS[0]) is None:
        raise ImageError(f"{KATA_INITRD_COMPRESS[0]} is not installed (apt-get install zstd)")
    modules_dir = root / "lib" / "modules"
    (release,) = (p.name for p in modules_dir.iterdir())
    module_closure(modules_dir / release, KATA_DRIVERS)  # each one there, or say which is not
    init = root / "init"
    init.write_text(KATA_INIT_SCRIPT)
    init.chmod(0o755)
    write_cpio(root, output, KATA_INITRD_COMPRESS)


def make_disk(root: Path, output: Path) -> None:
    size = int(_size(root) * 1.15) + FREE_SPACE
    _run(
        "mkfs.ext4", "-q", "-F", "-L", "pykata-root", "-d", str(root), str(output),
        f"{size >> 20}M", what="mkfs.ext4 -d",
    )  # fmt: skip


def root_tree(stage: Path, base_dir: Path, kernel_dir: Path, requirements: list[str]) -> None:
    """The guest's root file system in `stage`: the base, the kernel's modules, pykata."""
    release = kernel_release(kernel_dir)
    _run("cp", "-a", "--reflink=auto", str(base_dir), str(stage), what="copy base")
    stage.chmod(0o755)  # the base's directory is private to the cache; a root is not
    modules = stage / "lib" / "modules"
    modules.mkdir(parents=True, exist_ok=True)
    _run("cp", "-a", str(kernel_dir / "tree" / "lib" / "modules" / release),
         str(modules), what="copy modules")  # fmt: skip
    _run("chroot", str(stage), "depmod", release, what="depmod")
    install_pykata(stage, requirements)
    install_container_rootfs(stage)
    (stage / "etc" / "hostname").write_text("pykata-guest\n")


def image(
    directory: Path, base_dir: Path, kernel_dir: Path, progress: Progress, *, kata_initrd: bool
) -> GuestImage:
    requirements = guest_requirements()
    key = _key(base_dir.name, kernel_dir.name, sources_digest(), requirements)
    final = directory / f"image-{key}"
    if final.is_dir():
        built = GuestImage(final)
        if kata_initrd and not built.kata_initrd.exists():
            add_kata_initrd(built, base_dir, kernel_dir, requirements, progress)
        return built
    release = kernel_release(kernel_dir)
    with _building(final) as work:
        stage = work / "root"
        with progress.step("root file system: base + kernel modules + pykata"):
            root_tree(stage, base_dir, kernel_dir, requirements)
        with progress.step("initramfs"):
            make_initramfs(stage, release, work / "initramfs.cpio")
        with progress.step("root disk (ext4)"):
            make_disk(stage, work / "root.img")
        if kata_initrd:  # last: it adds /init to the tree
            with progress.step("Kata initrd (the whole root, compressed)"):
                make_kata_initrd(stage, work / KATA_INITRD)
        shutil.copy2(kernel_dir / "tree" / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
        shutil.rmtree(stage)
        manifest = {
            "kernel": (kernel_dir / "package").read_text().strip(),
            "kernel_release": release,
            "suite": SUITE,
            "packages": list(PACKAGES),
            "python_requirements": requirements,
            "pykata": pykata.__version__,
            "pykata_sources": sources_digest(),
            "container_rootfs": GUEST_ROOTFS,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return GuestImage(final)


def add_kata_initrd(
    built: GuestImage, base_dir: Path, kernel_dir: Path, requirements: list[str],
    progress: Progress,
) -> None:  # fmt: skip
    """The Kata initrd for an image built without it: the same root, made again."""
    with tempfile.TemporaryDirectory(prefix=".kata-initrd.", dir=built.directory) as tmp:
        stage = Path(tmp) / "root"
        with progress.step("root file system: base + kernel modules + pykata"):
            root_tree(stage, base_dir, kernel_dir, requirements)
        with progress.step("Kata initrd (the whole root, compressed)"):
            make_kata_initrd(stage, Path(tmp) / KATA_INITRD)
        os.rename(Path(tmp) / KATA_INITRD, built.kata_initrd)


#: An image no build has used for this long is removed (two checkouts of different
#: sources share the cache: each keeps its own image while it is in use).
KEEP_UNUSED_SECONDS = 24 * 3600


def build(
    directory: Path | None = None,
    *,
    rebuild: bool = False,
    quiet: bool = False,
    kata_initrd: bool = False,
) -> GuestImage:
    """Build (or find cached) the guest image; `directory/current` points at it.

    With `kata_initrd`, the image also has the initrd for the real Kata runtime.
    """
    directory = (directory or default_dir()).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    progress = Progress(quiet)
    if rebuild:
        for old in directory.glob("image-*"):
            shutil.rmtree(old)
    started = time.monotonic()
    base_dir = base(directory, progress)
    kernel_dir = kernel(directory, progress)
    built = image(directory, base_dir, kernel_dir, progress, kata_initrd=kata_initrd)
    link = directory / "current"
    tmp_link = directory / ".current"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(built.directory.name)
    os.replace(tmp_link, link)
    os.utime(built.directory)  # in use: kept while other checkouts build theirs
    for old in directory.glob("image-*"):
        unused = time.time() - old.stat().st_mtime > KEEP_UNUSED_SECONDS
        if old != built.directory and unused:
            shutil.rmtree(old, ignore_errors=True)
    sizes = (
        f"kernel {_mib(_size(built.kernel))}, initramfs {_mib(_size(built.initramfs))}, "
        f"root disk {_mib(_size(built.root_disk))}"
    )
    if built.kata_initrd.exists():
        sizes += f", Kata initrd {_mib(_size(built.kata_initrd))}"
    progress.say(f"{built.directory} ready in {time.monotonic() - started:.1f}s: {sizes}")
    if kata_initrd:
        progress.say(
            f'for Kata (docs/kata-runtime.md): kernel = "{link / "vmlinuz"}", '
            f'initrd = "{link / KATA_INITRD}" (copy them: `current` moves on a rebuild)'
        )
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kata-guest-image",
        description="Build the guest image QEMU boots for `kata-agent-ctl connect --vm qemu` "
        "and `kata-agent-ctl vm`: kernel, initramfs, root disk with the agent. Cached: parts "
        "are rebuilt only when their inputs change.",
        epilog="examples:\n  kata-guest-image\n  kata-guest-image --output /var/tmp/guest "
        "--rebuild\n  kata-guest-image --kata-initrd\n  make guest-image",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help=f"cache directory (default ${DEFAULT_DIR_ENV}, else ~/.cache/pykata/guest)",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="rebuild every part of the image (default: off)"
    )
    parser.add_argument(
        "--kata-initrd",
        action="store_true",
        help=f"also build {KATA_INITRD}: the whole guest as one initrd, for the real Kata "
        "runtime's `initrd =` key with this image's vmlinuz (docs/kata-runtime.md) (default: off)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress lines (default: off)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("kata-guest-image: must run as root (debootstrap, chroot)", file=sys.stderr)
        return 1
    try:
        built = build(
            args.output, rebuild=args.rebuild, quiet=args.quiet, kata_initrd=args.kata_initrd
        )
    except ImageError as exc:
        print(f"kata-guest-image: {exc}", file=sys.stderr)
        return 1
    print(built.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
