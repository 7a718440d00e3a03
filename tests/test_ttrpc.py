"""The ttRPC server and client together, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.rpc.status_pb2 import Status

from pykata.api.health_pb2 import CheckRequest, HealthCheckResponse
from pykata.ttrpc import (
    Client,
    Code,
    LazyService,
    Server,
    ServerContext,
    ServerStream,
    Service,
    StreamMethod,
    TtrpcError,
    UnaryMethod,
)
from pykata.ttrpc.frame import MAX_DATA_SIZE, FrameDecoder, MessageType, encode_frame
from pykata.ttrpc.testing import connected
from pykata.ttrpc.ttrpc_pb2 import Response

from .conftest import call_with_server_deadline

SERVICE = "pykata.test.Peer"


class Failure(TtrpcError):
    code = Code.NOT_FOUND


async def sleep_echo(request: CheckRequest, ctx: ServerContext) -> CheckRequest:
    """`service` names seconds to sleep; the request comes back."""
    await asyncio.sleep(float(request.service or 0))
    return request


async def metadata_echo(request: CheckRequest, ctx: ServerContext) -> CheckRequest:
    pairs = sorted(f"{k}={v}" for k, vs in ctx.metadata.items() for v in vs)
    return CheckRequest(service=",".join(pairs))


async def fail(request: CheckRequest, ctx: ServerContext) -> CheckRequest:
    if request.service == "domain":
        raise Failure(message="no container abc")
    raise RuntimeError("boom in handler")


async def own_timeout(request: CheckRequest, ctx: ServerContext) -> CheckRequest:
    raise TimeoutError("the disk did not answer")


async def huge(request: CheckRequest, ctx: ServerContext) -> CheckRequest:
    return CheckRequest(service="x" * (MAX_DATA_SIZE + 1))


async def sum_stream(stream: ServerStream, ctx: ServerContext) -> bytes:
    total = 0
    while (message := await stream.recv()) is not None:
        total += int(message)
        stream.send(str(total).encode())
    return f"total={total}".encode()


def peer_service() -> Service:
    return Service(
        SERVICE,
        {
            "Sleep": UnaryMethod(CheckRequest, sleep_echo),
            "Metadata": UnaryMethod(CheckRequest, metadata_echo),
            "Fail": UnaryMethod(CheckRequest, fail),
            "Huge": UnaryMethod(CheckRequest, huge),
            "OwnTimeout": UnaryMethod(CheckRequest, own_timeout),
            "Sum": StreamMethod(sum_stream),
        },
    )


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    server = Server([peer_service()])
    yield server
    await server.shutdown(grace=1)


@pytest.fixture
async def unix_client(server: Server, tmp_path: Path) -> AsyncIterator[Client]:
    await server.start(f"unix://{tmp_path}/s.sock")
    async with await Client.connect(f"unix://{tmp_path}/s.sock") as client:
        yield client


async def call(client: Client, method: str, arg: str = "", **kw: object) -> CheckRequest:
    return await client.call(SERVICE, method, CheckRequest(service=arg), CheckRequest, **kw)  # type: ignore[arg-type]


async def test_many_calls_in_flight_answered_in_any_order(unix_client: Client) -> None:
    finished: list[str] = []

    async def one(delay: str) -> None:
        reply = await call(unix_client, "Sleep", delay)
        finished.append(reply.service)

    await asyncio.gather(*(one(d) for d in ["0.3", "0.2", "0.1", "0"]))
    assert finished == ["0", "0.1", "0.2", "0.3"]


async def test_unknown_service_and_method_answer_as_ttrpc_rust_naming_them(
    unix_client: Client,
) -> None:
    with pytest.raises(TtrpcError) as exc:
        await unix_client.call("no.Such", "Thing", CheckRequest(), CheckRequest)
    assert exc.value.code == Code.INVALID_ARGUMENT and "no.Such" in exc.value.message
    with pytest.raises(TtrpcError) as exc:
        await call(unix_client, "Nope")
    assert exc.value.code == Code.UNIMPLEMENTED
    assert f"{SERVICE}/Nope" in exc.value.message


async def test_domain_error_keeps_its_code_other_errors_are_internal_and_logged(
    unix_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(TtrpcError) as exc:
        await call(unix_client, "Fail", "domain")
    assert (exc.value.code, exc.value.message) == (Code.NOT_FOUND, "no container abc")
    with caplog.at_level(logging.ERROR, logger="pykata"), pytest.raises(TtrpcError) as exc:
        await call(unix_client, "Fail", "other")
    assert exc.value.code == Code.INTERNAL and "boom in handler" in exc.value.message
    assert any("boom in handler" in r.getMessage() for r in caplog.records)
    assert (await call(unix_client, "Sleep", "0")).service == "0"  # still serving


async def test_deadline_is_enforced_by_the_server(server: Server) -> None:
    async with connected(server) as client:
        payload = CheckRequest(service="5").SerializeToString()
        with pytest.raises(TtrpcError) as exc:
            await call_with_server_deadline(client, SERVICE, "Sleep", payload, 100_000_000)
    assert exc.value.code == Code.DEADLINE_EXCEEDED
    assert "deadline" in exc.value.message


async def test_handler_timeout_error_without_a_deadline_is_internal(unix_client: Client) -> None:
    with pytest.raises(TtrpcError) as exc:
        await call(unix_client, "OwnTimeout")
    assert exc.value.code == Code.INTERNAL and "the disk did not answer" in exc.value.message


async def test_client_timeout_is_deadline_exceeded(unix_client: Client) -> None:
    with pytest.raises(TtrpcError) as exc:
        await call(unix_client, "Sleep", "2", timeout=0.1)
    assert exc.value.code == Code.DEADLINE_EXCEEDED


async def test_metadata_reaches_the_handler(unix_client: Client) -> None:
    reply = await call(
        unix_client, "Metadata", metadata={"traceparent": "00-1-2-01", "k": ["a", "b"]}
    )
    assert reply.service == "k=a,k=b,traceparent=00-1-2-01"


async def test_oversize_response_becomes_resource_exhausted(unix_client: Client) -> None:
    with pytest.raises(TtrpcError) as exc:
        await call(unix_client, "Huge")
    assert exc.value.code == Code.RESOURCE_EXHAUSTED
    assert (await call(unix_client, "Sleep", "0")).service == "0"


async def test_client_refuses_to_send_oversize(unix_client: Client) -> None:
    with pytest.raises(TtrpcError) as exc:
        await call(unix_client, "Sleep", "x" * (MAX_DATA_SIZE + 1))
    assert exc.value.code == Code.RESOURCE_EXHAUSTED
    assert (await call(unix_client, "Sleep", "0")).service == "0"


async def test_connection_loss_fails_every_pending_call_with_unavailable(tmp_path: Path) -> None:
    server = Server([peer_service()])
    await server.start(f"unix://{tmp_path}/s.sock")
    client = await Client.connect(f"unix://{tmp_path}/s.sock")
    calls = [asyncio.ensure_future(call(client, "Sleep", "10")) for _ in range(5)]
    await asyncio.sleep(0.1)
    await server.shutdown(grace=0)  # cancels handlers and drops the connection
    results = await asyncio.gather(*calls, return_exceptions=True)
    codes = {r.code for r in results if isinstance(r, TtrpcError)}
    assert len(codes) >= 1 and codes <= {Code.UNAVAILABLE, Code.CANCELLED}
    assert all(isinstance(r, TtrpcError) for r in results)
    with pytest.raises(TtrpcError) as exc:
        await call(client, "Sleep", "0")
    assert exc.value.code == Code.UNAVAILABLE
    await client.close()


async def test_killed_server_process_fails_pending_calls_at_once(tmp_path: Path) -> None:
    """Connection dropped under the client: every pending call fails with UNAVAILABLE."""
    server = Server([peer_service()])
    await server.start(f"unix://{tmp_path}/s.sock")
    client = await Client.connect(f"unix://{tmp_path}/s.sock")
    calls = [asyncio.ensure_future(call(client, "Sleep", "10")) for _ in range(3)]
    await asyncio.sleep(0.1)
    for conn in list(server._connections):
        assert conn.transport is not None
        conn.transport.abort()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
    assert [r.code for r in results if isinstance(r, TtrpcError)] == [Code.UNAVAILABLE] * 3
    await client.close()
    await server.shutdown(grace=0)


async def test_graceful_shutdown_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    server = Server([peer_service()])
    await server.start(f"unix://{tmp_path}/s.sock")
    client = await Client.connect(f"unix://{tmp_path}/s.sock")
    slow = asyncio.ensure_future(call(client, "Sleep", "0.3"))
    await asyncio.sleep(0.05)
    await server.shutdown(grace=5)
    assert (await slow).service == "0.3"
    assert not os.path.exists(tmp_path / "s.sock")
    await client.close()


async def test_shutdown_bound_cancels_calls_that_overrun_it(tmp_path: Path) -> None:
    server = Server([peer_service()])
    await server.start(f"unix://{tmp_path}/s.sock")
    client = await Client.connect(f"unix://{tmp_path}/s.sock")
    slow = asyncio.ensure_future(call(client, "Sleep", "30"))
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    await server.shutdown(grace=0.2)
    assert asyncio.get_running_loop().time() - started < 5
    with pytest.raises(TtrpcError) as exc:
        await slow
    assert exc.value.code in (Code.CANCELLED, Code.UNAVAILABLE)
    await client.close()


async def test_streaming_both_ways(server: Server) -> None:
    async with connected(server) as client:
        stream = client.stream(SERVICE, "Sum")
        for n in (1, 2, 3):
            stream.send(str(n).encode())
        stream.close_send()
        partials = []
        while (message := await stream.recv()) is not None:
            partials.append(message)
        assert partials == [b"1", b"3", b"6"]
        assert await stream.response() == b"total=6"


async def test_unix_socket_is_owner_only(server: Server, tmp_path: Path) -> None:
    await server.start(f"unix://{tmp_path}/s.sock")
    assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600


async def test_health_descriptor_service_binding(tmp_path: Path) -> None:
    from pykata.agent.serving import health_service

    server = Server([health_service()])
    async with connected(server) as client:
        reply = await client.call("grpc.Health", "Check", CheckRequest(), HealthCheckResponse)
        assert reply.status == HealthCheckResponse.SERVING
    await server.shutdown(grace=0)


async def test_lazy_service_is_made_on_its_first_call_and_a_failed_load_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loads: list[str] = []

    def load() -> Service:
        loads.append("load")
        if len(loads) == 1:
            raise ImportError("no module named peer_handlers")
        return peer_service()

    server = Server([LazyService(SERVICE, load)])
    await server.start(f"unix://{tmp_path}/s.sock")
    async with await Client.connect(f"unix://{tmp_path}/s.sock") as client:
        # Nothing is loaded for calls to other services, or before any call.
        with pytest.raises(TtrpcError) as exc:
            await client.call("no.Such", "Thing", CheckRequest(), CheckRequest)
        assert exc.value.code == Code.INVALID_ARGUMENT and loads == []
        # A load that fails fails that call, naming the service and why; the server serves on.
        with (
            caplog.at_level(logging.ERROR, logger="pykata.ttrpc.server"),
            pytest.raises(TtrpcError) as exc,
        ):
            await call(client, "Sleep", "0")
        assert exc.value.code == Code.INTERNAL
        assert SERVICE in exc.value.message and "peer_handlers" in exc.value.message
        assert "cannot load service" in caplog.text
        # The next call loads it; later calls use what was loaded.
        assert (await call(client, "Sleep", "0")).service == "0"
        assert (await call(client, "Metadata")).service == ""
        assert loads == ["load", "load"]
        with pytest.raises(TtrpcError) as exc:
            await call(client, "Nope")
        assert exc.value.code == Code.UNIMPLEMENTED
    await server.shutdown(grace=0)


def test_a_lazy_service_name_can_be_registered_once() -> None:
    server = Server([LazyService(SERVICE, peer_service)])
    with pytest.raises(ValueError, match="already registered"):
        server.add_service(peer_service())
    with pytest.raises(ValueError, match="already registered"):
        server.add_service(LazyService(SERVICE, peer_service))


async def test_a_server_gone_in_the_middle_of_a_big_answer_fails_the_calls(
    tmp_path: Path,
) -> None:
    # The client reads a big answer straight into its own buffer: a server that
    # closes the connection halfway through it must fail the calls, not leave
    # them waiting for the rest.
    async def half_an_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        stream_ids: list[int] = []
        while len(stream_ids) < 2:
            stream_ids += [frame.stream_id for frame in decoder.feed(await reader.read(4096))]
        answer = Response(status=Status(code=Code.OK), payload=b"x" * (1 << 20))
        frame = encode_frame(stream_ids[0], MessageType.RESPONSE, 0, answer.SerializeToString())
        writer.write(frame[: len(frame) // 2])
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(half_an_answer, tmp_path / "s.sock")
    try:
        async with await Client.connect(f"unix://{tmp_path}/s.sock") as client:
            calls = [client.call_raw("s", "m", b"", timeout=60) for _ in range(2)]
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        server.close()
    for result in results:
        assert isinstance(result, TtrpcError) and result.code == Code.UNAVAILABLE
        assert "in the middle of a frame" in result.message
