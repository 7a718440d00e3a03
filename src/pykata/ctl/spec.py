"""The spec for `--bundle-dir`: its config.json, with the rootfs path made absolute;
or, if the bundle has a rootfs but no config.json (or only a rootfs directory
is given), pykata.ocispec's default: a shell in the rootfs with the usual
namespaces, /proc, /dev and /sys mounted, default capabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..api import oci_pb2
from ..ocispec import default_config, to_spec
from .api import CommandError

__all__ = ["default_config", "from_bundle", "to_spec"]


def from_bundle(bundle: Path) -> oci_pb2.Spec:
    """The spec for a bundle directory (config.json, or a default for its rootfs)."""
    config_file = bundle / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise CommandError(f"{config_file} is not valid JSON: {exc}") from None
        root = Path(config.get("root", {}).get("path", "rootfs"))
        config.setdefault("root", {})["path"] = str((bundle / root).resolve())
    elif (bundle / "rootfs").is_dir():
        config = default_config(str((bundle / "rootfs").resolve()))
    elif (bundle / "bin").is_dir():  # the directory is itself a rootfs
        config = default_config(str(bundle.resolve()))
    else:
        raise CommandError(f"{bundle} has neither config.json nor a rootfs directory")
    return to_spec(config)
