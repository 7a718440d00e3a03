"""The guest VM: its image (image.py) and launching it under QEMU (qemu.py).

The names host and guest agree on live here, so that callers such as
kata-agent-ctl can use them without loading the image builder or launcher.
"""

#: A busybox root file system for containers, inside the guest image.
GUEST_ROOTFS = "/usr/share/pykata/busybox-rootfs"
#: The shared directory's tag, as Kata names it; the agent mounts it at GUEST_SHARE.
SHARE_TAG = "kataShared"
GUEST_SHARE = "/run/kata-containers/shared/containers"
