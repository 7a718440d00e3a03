"""Addresses, as the Kata agent, runtime and agent-ctl spell them.

vsock://CID:PORT     AF_VSOCK; CID -1 means any (listen) - VMADDR_CID_ANY
unix:///PATH         filesystem unix socket
unix://@NAME         abstract unix socket (Linux; no file)
hvsock:///PATH:PORT  hybrid vsock: the VMM's unix socket PATH, then the
                     line exchange "CONNECT PORT\\n" -> "OK N\\n" (connect);
                     listening binds the unix socket PATH_PORT, where the
                     VMM delivers guest connections to that host port.
serial://NAME        (pykata extension, in a guest) the virtio-serial port
                     called NAME, or serial:///dev/vportNpM; one host client
                     at a time (serial.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AddressError

FORMS = "vsock://CID:PORT, unix:///PATH, unix://@NAME, hvsock:///PATH:PORT, serial://NAME"


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock://{self.cid}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True)
class AbstractAddress:
    name: str

    def __str__(self) -> str:
        return f"unix://@{self.name}"


@dataclass(frozen=True)
class HybridVsockAddress:
    uds_path: str
    port: int

    def __str__(self) -> str:
        return f"hvsock://{self.uds_path}:{self.port}"

    @property
    def listen_path(self) -> str:
        """Where a host-side listener for guest connections to `port` binds."""
        return f"{self.uds_path}_{self.port}"


@dataclass(frozen=True)
class SerialAddress:
    """A virtio-serial port in a guest, by name (or by device path)."""

    name: str

    def __str__(self) -> str:
        return f"serial://{self.name}"


Address = VsockAddress | UnixAddress | AbstractAddress | HybridVsockAddress | SerialAddress


def _bad(text: str, why: str) -> AddressError:
    return AddressError(f"invalid address {text!r}: {why}; accepted forms: {FORMS}")


def _port(text: str, value: str, bits: int = 32) -> int:
    if not re.fullmatch(r"\d+", value):
        raise _bad(text, f"port {value!r} is not a non-negative integer")
    port = int(value)
    if port >= 1 << bits:
        raise _bad(text, f"port {port} is out of range")
    return port


def parse_address(text: str) -> Address:
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _bad(text, "no scheme")
    if scheme == "vsock":
        cid_text, colon, port_text = rest.rpartition(":")
        if not colon or not re.fullmatch(r"-1|\d+", cid_text):
            raise _bad(text, "expected vsock://CID:PORT with CID a number or -1")
        cid = int(cid_text)
        if cid >= 1 << 32:
            raise _bad(text, f"CID {cid} is out of range")
        return VsockAddress(cid, _port(text, port_text))
    if scheme == "unix":
        if rest.startswith("@"):
            if len(rest) == 1:
                raise _bad(text, "empty abstract socket name")
            return AbstractAddress(rest[1:])
        if not rest.startswith("/"):
            raise _bad(text, "a unix socket path must be absolute (unix:///PATH)")
        return UnixAddress(rest)
    if scheme == "hvsock":
        path, colon, port_text = rest.rpartition(":")
        if not colon or not path.startswith("/"):
            raise _bad(text, "expected hvsock:///PATH:PORT with an absolute PATH")
        return HybridVsockAddress(path, _port(text, port_text))
    if scheme == "serial":
        if not rest or (not rest.startswith("/") and not re.fullmatch(r"[\w.-]+", rest)):
            raise _bad(text, "expected serial://PORT-NAME or serial:///dev/vportNpM")
        return SerialAddress(rest)
    raise _bad(text, f"unsupported scheme {scheme!r}")


def as_address(address: str | Address) -> Address:
    return parse_address(address) if isinstance(address, str) else address
