"""Wire compatibility with containerd's Go ttRPC (Debian's package), both directions.

The Go peer (tests/go/ttrpcpeer) builds its messages from the reference
descriptor set, so neither side shares code with the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.api import health_pb2
from pykata.ttrpc import Client, Code, TtrpcError

from .conftest import AgentProcess, call_with_server_deadline
from .peers import go_client, go_server

pytestmark = pytest.mark.go

# --- Go client -> our agent -----------------------------------------------------


def test_go_client_check_and_version(go_peer: Path, agent: AgentProcess) -> None:
    assert agent.socket_path
    [check] = go_client(agent.socket_path, "check")
    assert check["status"] == {"code": 0, "message": ""} and check["serving"] == 1
    [version] = go_client(agent.socket_path, "version")
    assert version["agent_version"] == "0.1.0" and version["grpc_version"] == "0.0.1"


def test_go_client_unknown_method_and_service(go_peer: Path, agent: AgentProcess) -> None:
    assert agent.socket_path
    method, service = go_client(agent.socket_path, "unknown")
    assert method["status"] == {
        "code": Code.UNIMPLEMENTED,
        "message": "method grpc.AgentService/NoSuchMethod is not implemented",
    }
    # as ttrpc-rust, the Kata agent's library, answers (Go's server says UNIMPLEMENTED)
    assert service["status"] == {
        "code": Code.INVALID_ARGUMENT,
        "message": "unknown service no.Such",
    }


def test_go_client_oversize_message_then_same_connection_works(
    go_peer: Path, agent: AgentProcess
) -> None:
    assert agent.socket_path
    # The Go 1.1 client sends a 5 MiB request as is; we refuse it and keep the connection.
    sent, after = go_client(agent.socket_path, "send-oversize")
    assert sent["status"]["code"] == Code.RESOURCE_EXHAUSTED  # type: ignore[index]
    assert "exceeds maximum message size of 4194304" in sent["status"]["message"]  # type: ignore[index]
    assert after["status"] == {"code": 0, "message": ""}
    # Raw frames: oversize header on stream 1, then a Check on stream 3, one connection.
    [raw] = go_client(agent.socket_path, "oversize")
    assert raw["first"]["code"] == Code.RESOURCE_EXHAUSTED and raw["first"]["stream"] == 1  # type: ignore[index]
    assert raw["second"]["code"] == 0 and raw["second"]["stream"] == 3  # type: ignore[index]


def test_go_client_concurrent_calls(go_peer: Path, agent: AgentProcess) -> None:
    assert agent.socket_path
    [result] = go_client(agent.socket_path, "concurrent", "-n", "500")
    assert result == {"op": "concurrent", "calls": 500, "ok": 500}


# --- our client -> Go server ------------------------------------------------------


@pytest.fixture
def go_server_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "go.sock")
    with go_server(path):
        yield path


async def test_our_client_calls_go_server(go_server_path: str) -> None:
    async with await Client.connect(f"unix://{go_server_path}") as client:
        check = await client.call(
            "grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        version = await client.call(
            "grpc.Health",
            "Version",
            health_pb2.CheckRequest(),
            health_pb2.VersionCheckResponse,
            metadata={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
        assert version.grpc_version == "go-ttrpc-peer"
        assert version.agent_version == (
            "traceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        )
        with pytest.raises(TtrpcError) as exc:
            await client.call_raw("grpc.AgentService", "CreateContainer", b"")
        assert exc.value.code == Code.UNIMPLEMENTED and "grpc.AgentService" in exc.value.message


async def test_our_client_multiplexes_against_go_server(go_server_path: str) -> None:
    async with await Client.connect(f"unix://{go_server_path}") as client:
        order: list[str] = []

        async def sleep(duration: str) -> None:
            reply = await client.call(
                "pykata.test.Peer",
                "Sleep",
                health_pb2.CheckRequest(service=duration),
                health_pb2.CheckRequest,
            )
            order.append(reply.service)

        await asyncio.gather(*(sleep(d) for d in ["300ms", "200ms", "100ms", "0s"]))
        assert order == ["0s", "100ms", "200ms", "300ms"]
        results = await asyncio.gather(
            *(
                client.call(
                    "grpc.Health",
                    "Check",
                    health_pb2.CheckRequest(),
                    health_pb2.HealthCheckResponse,
                )
                for _ in range(200)
            )
        )
        assert all(r.status == health_pb2.HealthCheckResponse.SERVING for r in results)


async def test_go_server_honours_our_deadline(go_server_path: str) -> None:
    async with await Client.connect(f"unix://{go_server_path}") as client:
        # Our timeout_nano reaches the Go server, which cancels the handler.
        payload = health_pb2.CheckRequest(service="5s").SerializeToString()
        with pytest.raises(TtrpcError) as exc:
            await call_with_server_deadline(
                client, "pykata.test.Peer", "Sleep", payload, 200_000_000
            )
        assert exc.value.code == Code.DEADLINE_EXCEEDED
