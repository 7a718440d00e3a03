"""The virtio-serial channel: addresses, finding ports, their modules, serving one.

The port itself exists only in a guest: tests/test_vm.py drives it for real.
Here a pseudo-terminal in raw mode stands in for it (a byte stream the server
opens by path, the test being the host side). How the ttRPC server tells its
clients apart on a port: test_ttrpc_boundaries.py.
"""

from __future__ import annotations

import asyncio
import os
import tty

import pytest

from pykata.agent import init
from pykata.api import health_pb2
from pykata.transport import AddressError, SerialAddress, parse_address
from pykata.transport.serial import PortError, find_port
from pykata.ttrpc import Server
from pykata.ttrpc.protocol import ClientConnection, ResponseReceived
from pykata.ttrpc.server import ServerContext, Service


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


async def _answer(host: int, client: ClientConnection) -> ResponseReceived:
    loop = asyncio.get_running_loop()
    while True:
        event = client.next_event()
        if event is not None:
            assert isinstance(event, ResponseReceived)
            return event
        readable = loop.create_future()
        loop.add_reader(host, readable.set_result, None)
        try:
            await readable
        finally:
            loop.remove_reader(host)
        client.receive_data(os.read(host, 1 << 16))


async def test_a_port_opened_ahead_serves_nothing_until_told_then_serves() -> None:
    """The agent parked for a snapshot opens its port and makes the first connection
    before the snapshot, and serves only once restored (agent/restore.py)."""
    host, guest = os.openpty()
    tty.setraw(guest)
    server = Server()
    server.add_service(
        Service.from_descriptor(health_pb2.DESCRIPTOR.services_by_name["Health"], _Health())
    )
    listener = await server.start(f"serial://{os.ttyname(guest)}", start_serving=False)
    try:
        client = ClientConnection()
        _, frame = client.request("grpc.Health", "Check", b"")
        os.write(host, frame)
        await asyncio.sleep(0.3)  # room for a server that would not wait
        os.set_blocking(host, False)
        with pytest.raises(BlockingIOError):  # no answer yet
            os.read(host, 1 << 16)
        await listener.start_serving()
        answer = await asyncio.wait_for(_answer(host, client), 30)
        assert answer.status.code == 0
        reply = health_pb2.HealthCheckResponse.FromString(answer.payload)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.shutdown(grace=1)
        os.close(host)
        os.close(guest)


class _Health:
    async def Check(
        self, request: health_pb2.CheckRequest, ctx: ServerContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
