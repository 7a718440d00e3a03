"""The virtio-serial channel's pure parts: addresses, finding ports, their modules.

The port itself exists only in a guest: tests/test_vm.py drives it for real.
How the ttRPC server tells its clients apart on a port: test_ttrpc_boundaries.py.
"""

from __future__ import annotations

import pytest

from pykata.agent import init
from pykata.transport import AddressError, SerialAddress, parse_address
from pykata.transport.serial import PortError, find_port


def test_serial_addresses_parse() -> None:
    assert parse_address("serial://agent.channel.0") == SerialAddress("agent.channel.0")
    assert parse_address("serial:///dev/vport0p1") == SerialAddress("/dev/vport0p1")
    assert str(SerialAddress("agent.channel.0")) == "serial://agent.channel.0"
    for bad in ("serial://", "serial://a b", "serial://../x"):
        with pytest.raises(AddressError, match="serial://PORT-NAME"):
            parse_address(bad)


def test_a_missing_port_is_named() -> None:
    with pytest.raises(PortError, match=r"no virtio-serial port named 'nosuch\.channel'"):
        find_port("nosuch.channel")


def test_the_channels_modules_are_loaded_by_scheme() -> None:
    addresses = ["serial://agent.channel.0", "serial://trace.channel.0", "vsock://-1:1026"]
    assert init.modules_for(addresses) == ["virtio_console", "vmw_vsock_virtio_transport"]
    assert init.modules_for(["unix:///tmp/a.sock"]) == []
