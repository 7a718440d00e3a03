"""Booting a guest for kata-agent-ctl: `connect --vm qemu` and the `vm` subcommand."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ..clihelp import Formatter
from ..vm import GUEST_ROOTFS

if TYPE_CHECKING:
    from ..vm import qemu, snapshot

#: Kata's default_memory: the Kata initrd's root file system lives in guest memory.
KATA_MEMORY_MIB = 2048

# The image builder and the launcher are imported when a guest is wanted, not
# at every kata-agent-ctl start (importlib.metadata alone costs ~15 ms).

EPILOG = """\
The guest image comes from `make guest-image` (kata-guest-image); the agent
serves on a virtio-serial port that QEMU exposes as a unix socket (see
docs/vm.md). KVM is used when it works here, else software emulation (TCG).

examples:
  kata-agent-ctl vm
  kata-agent-ctl vm --debug-console --run-dir /tmp/guest
  kata-agent-ctl vm --trace-socket /tmp/forwarder.sock --cpus 2
  kata-agent-ctl vm --bundle-dir ./bundle   # connect with --bundle-dir ./bundle --shared-bundle
  kata-agent-ctl vm --kata-initrd           # the guest as the real Kata runtime would boot it
  kata-agent-ctl vm --snapshot /var/tmp/snap    # boot once, save the parked guest, exit
  kata-agent-ctl vm --from-snapshot /var/tmp/snap   # a new guest from it, in about a second
"""


def add_vm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("guest VM (with --vm qemu, or the vm command)")
    group.add_argument(
        "--guest-dir",
        type=Path,
        metavar="DIR",
        help="where `make guest-image` put the image (default: ~/.cache/pykata/guest)",
    )
    group.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="auto (KVM if it works here, else TCG), kvm or tcg",
    )
    group.add_argument(
        "--channel",
        choices=["auto", "vsock", "serial"],
        default="auto",
        help="auto (vsock if the host has /dev/vhost-vsock, else virtio-serial ports)",
    )
    group.add_argument(
        "--kata-initrd",
        action="store_true",
        help="boot the image's Kata initrd as Kata's runtime boots an initrd (q35, no disk, "
        "Kata's kernel command line); build it with `kata-guest-image --kata-initrd` "
        "(default: off)",
    )
    group.add_argument("--cpus", type=int, default=1, help="guest CPUs (default: 1)")
    group.add_argument(
        "--memory",
        type=int,
        metavar="MIB",
        help="guest memory in MiB (default: 512; with --kata-initrd 2048, Kata's default: "
        "the root lives in memory)",
    )
    group.add_argument(
        "--kernel-params",
        default="",
        metavar="PARAMS",
        help="more guest kernel command line (default: none)",
    )
    group.add_argument(
        "--trace-socket",
        metavar="PATH",
        help="turn on agent tracing; its spans go to a forwarder listening on this unix "
        "socket (default: tracing off)",
    )
    group.add_argument(
        "--debug-console", action="store_true", help="give the guest a debug console"
    )
    group.add_argument(
        "--from-snapshot",
        type=Path,
        metavar="DIR",
        help="restore the guest from the snapshot in DIR instead of booting it (made there "
        "first when DIR has none, or one for another image or other options; docs/vm.md) "
        "(default: boot)",
    )
    group.add_argument(
        "--boot-timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="how long the agent may take to answer",
    )


def vm_options(
    args: argparse.Namespace, run_dir: Path | None = None, shared_dir: Path | None = None
) -> qemu.VmOptions:
    from ..vm import image, qemu

    return qemu.VmOptions(
        shared_dir=shared_dir,
        image=image.current(args.guest_dir),
        accel=args.accel,
        channel=args.channel,
        memory_mib=args.memory or (KATA_MEMORY_MIB if args.kata_initrd else 512),
        layout="kata-initrd" if args.kata_initrd else "pykata",
        cpus=args.cpus,
        kernel_params=args.kernel_params,
        trace_socket=args.trace_socket,
        debug_console=args.debug_console,
        run_dir=run_dir,
        boot_timeout=args.boot_timeout,
    )


def _say(text: str) -> None:
    print(f"kata-agent-ctl: {text}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM takes the same clean way out as Ctrl-C: the guest is stopped.
    raise KeyboardInterrupt


@contextlib.contextmanager
def booted(
    args: argparse.Namespace, run_dir: Path | None = None, shared_dir: Path | None = None
) -> Iterator[qemu.Vm]:
    """A guest whose agent answers (booted, or restored from --from-snapshot), stopped
    when the block ends (whatever happens)."""
    from ..vm import qemu, snapshot

    options = vm_options(args, run_dir, shared_dir)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.from_snapshot:
            saved = _snapshot(options, args.from_snapshot)
            launching = snapshot.restored(options, saved)
        else:
            _say(f"booting the guest ({options.image.directory.name}) ...")
            launching = qemu.launched(options)
        with launching as vm:
            how = f"restored from {args.from_snapshot} in" if vm.generation else "up in"
            _say(
                f"guest {how} {vm.ready_after:.1f}s; accel {vm.accel_reason}; "
                f"channel {vm.channel.kind}"
            )
            try:
                yield vm
            finally:
                _say(f"guest stopped: {qemu.stop(vm)}")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _snapshot(options: qemu.VmOptions, directory: Path) -> snapshot.Snapshot:
    """The snapshot in `directory`, made first when it is missing or out of date."""
    from ..vm import snapshot

    if not snapshot.Snapshot(directory).up_to_date(options):
        _say(f"making the snapshot in {directory} (booting the guest once) ...")
    return snapshot.ensure(options, directory)


def make_snapshot(args: argparse.Namespace) -> int:
    """vm --snapshot DIR: boot, save the parked guest into DIR, and stop."""
    from ..vm.image import ImageError
    from ..vm.qemu import VmError

    if args.bundle_dir:
        _say("a snapshot is made without --bundle-dir: give it to the guest restored from it")
        return 2
    try:
        options = vm_options(args)
        started = time.monotonic()
        saved = _snapshot(options, args.snapshot)
        _say(f"snapshot ready in {time.monotonic() - started:.1f}s")
        print(saved.directory)
        print(f"  kata-agent-ctl connect --vm qemu --from-snapshot {saved.directory} -c Check")
        return 0
    except (ImageError, VmError) as exc:
        _say(str(exc))
        return 1
    except OSError as exc:
        _say(_os_error(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def connect(args: argparse.Namespace, run_commands: Callable[..., int]) -> int:
    """connect --vm: the commands against a guest booted for them."""
    from ..vm.image import ImageError
    from ..vm.qemu import VmError

    # A bundle is shared with the guest (virtio-fs); without one, the image's busybox rootfs.
    shared = args.bundle_dir.resolve() if args.bundle_dir else None
    try:
        with booted(args, shared_dir=shared) as vm:
            args.server_address, args.hybrid_vsock = vm.agent_address, False
            if shared is None and not args.guest_rootfs:
                args.guest_rootfs = GUEST_ROOTFS
            return run_commands(args, shared_bundle=shared is not None)
    except (ImageError, VmError) as exc:
        _say(str(exc))
        return 1
    except OSError as exc:  # a path given that cannot be used (--run-dir, --guest-dir ...)
        _say(_os_error(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace) -> int:
    """The vm command: keep a guest up for interactive work until Ctrl-C."""
    from ..vm.image import ImageError
    from ..vm.qemu import VmError

    if args.snapshot:
        return make_snapshot(args)

    shared = args.bundle_dir.resolve() if args.bundle_dir else None
    rootfs = (
        f"--bundle-dir {shlex.quote(str(shared))} --shared-bundle"
        if shared
        else f"--guest-rootfs {GUEST_ROOTFS}"
    )
    try:
        with booted(args, args.run_dir, shared) as vm:
            print(f"agent:         {vm.agent_address}")
            print(
                f"  kata-agent-ctl connect --server-address {vm.agent_address} "
                f"{rootfs} -c 'run /bin/uname -a'"
            )
            if args.debug_console:
                print(f"debug console: kata-agent-ctl console {vm.console_address}")
            print(f"guest console: {vm.console_log}")
            print("Ctrl-C (or SIGTERM) stops the guest.", flush=True)
            while vm.process.poll() is None:
                time.sleep(0.5)
            _say(f"QEMU exited ({vm.process.returncode})")
            return 0 if vm.process.returncode == 0 else 1
    except KeyboardInterrupt:
        return 0
    except (ImageError, VmError) as exc:
        _say(str(exc))
        return 1
    except OSError as exc:
        _say(_os_error(exc))
        return 1


def _os_error(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser(
        "vm",
        help="boot a guest with the agent and keep it up for interactive work",
        description="Boot a guest VM whose init is the agent, print how to reach it, and "
        "keep it running until Ctrl-C.",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    add_vm_options(vm)
    vm.add_argument(
        "--bundle-dir",
        type=Path,
        metavar="DIR",
        help="share DIR with the guest (virtio-fs) for containers: connect with "
        "--bundle-dir DIR --shared-bundle (default: nothing shared)",
    )
    vm.add_argument(
        "--snapshot",
        type=Path,
        metavar="DIR",
        help="boot the guest, save it into DIR once its agent is ready, and stop; restore "
        "it with --from-snapshot DIR (kept while the image and options stay the same) "
        "(default: no snapshot)",
    )
    vm.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="put the sockets and console log here (default: a new temporary directory)",
    )
