"""The virtio-serial channel's pure parts: addresses, and telling ttRPC clients apart.

The port itself exists only in a guest: tests/test_vm.py drives it for real.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykata.agent import init
from pykata.transport import AddressError, SerialAddress, parse_address
from pykata.ttrpc.frame import MessageType, encode_frame
from pykata.virtio_serial import ClientBoundaries, PortError, find_port


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


def request(stream_id: int, payload: bytes = b"x") -> bytes:
    return encode_frame(stream_id, MessageType.REQUEST, 0, payload)


def client(count: int, payload: bytes) -> bytes:
    """A client's requests: streams 1, 3, 5, ... as ttRPC clients number them."""
    return b"".join(request(2 * n + 1, payload) for n in range(count))


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.binary(max_size=40),
    st.integers(1, 23),
)
def test_each_new_client_is_found_however_the_bytes_arrive(
    clients: list[int], payload: bytes, step: int
) -> None:
    # The stream ids restart at 1 with each client; a cut falls exactly there.
    sessions = [client(count, payload) for count in clients]
    wire = b"".join(sessions)
    boundaries = ClientBoundaries()
    got: list[bytearray] = []
    for offset in range(0, len(wire), step):
        for new_client, chunk in boundaries.feed(wire[offset : offset + step]):
            if new_client or not got:
                got.append(bytearray())
            got[-1] += chunk
    assert [bytes(s) for s in got] == sessions


def test_responses_and_a_payload_that_looks_like_a_header_do_not_cut() -> None:
    tricky = request(1)[:10]  # a request header for stream 1, as payload
    wire = request(1, tricky) + encode_frame(1, MessageType.RESPONSE, 0, b"") + request(3)
    assert ClientBoundaries().feed(wire) == [(False, wire)]
