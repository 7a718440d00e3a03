"""Interceptor chains around calls, on the server and the client (in-process, real framing),
and the interceptors of the agent (policy, RPC spans) and of kata-agent-ctl --trace."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from pykata import otlp
from pykata.api import agent_pb2
from pykata.api.health_pb2 import CheckRequest
from pykata.ttrpc import (
    ClientContext,
    Code,
    Invoker,
    Server,
    ServerContext,
    ServerStream,
    Service,
    StreamHandler,
    StreamMethod,
    TtrpcError,
    UnaryHandler,
    UnaryMethod,
)
from pykata.ttrpc.testing import connected

from .conftest import call_with_server_deadline

SERVICE = "pykata.test.Intercepted"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


class Calls:
    """What ran, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.contexts: list[ServerContext] = []

    async def echo(self, request: CheckRequest, ctx: ServerContext) -> CheckRequest:
        self.log.append("handler")
        self.contexts.append(ctx)
        pairs = sorted(f"{k}={v}" for k, vs in ctx.metadata.items() for v in vs)
        return CheckRequest(service=",".join(pairs) or request.service)

    async def sum(self, stream: ServerStream, ctx: ServerContext) -> bytes:
        self.log.append("stream handler")
        total = 0
        while (message := await stream.recv()) is not None:
            total += int(message)
        return f"total={total}".encode()

    def service(self) -> Service:
        return Service(
            SERVICE, {"Echo": UnaryMethod(CheckRequest, self.echo), "Sum": StreamMethod(self.sum)}
        )

    def interceptor(self, name: str) -> Any:
        async def intercept(request: Message, ctx: ServerContext, handler: UnaryHandler) -> Message:
            self.log.append(f"{name} before")
            try:
                response = await handler(request, ctx)
            except TtrpcError as exc:
                self.log.append(f"{name} saw {exc.code.name}")
                raise
            self.log.append(f"{name} after")
            return response

        return intercept


async def echo(client: Any, text: str = "", **kw: Any) -> str:
    reply = await client.call(SERVICE, "Echo", CheckRequest(service=text), CheckRequest, **kw)
    return str(reply.service)


async def test_server_interceptors_run_in_order_around_the_handler() -> None:
    calls = Calls()
    server = Server(
        [calls.service()], interceptors=[calls.interceptor("a"), calls.interceptor("b")]
    )
    async with connected(server) as client:
        assert await echo(client, "hi") == "hi"
    await server.shutdown(grace=0)
    assert calls.log == ["a before", "b before", "handler", "b after", "a after"]


async def test_an_interceptor_may_change_the_request_and_the_answer() -> None:
    calls = Calls()

    async def shout(request: CheckRequest, ctx: ServerContext, handler: UnaryHandler) -> Message:
        response = await handler(CheckRequest(service=request.service + "!"), ctx)
        assert isinstance(response, CheckRequest)
        return CheckRequest(service=response.service.upper())

    server = Server([calls.service()], interceptors=[shout])
    async with connected(server) as client:
        assert await echo(client, "hi") == "HI!"
    await server.shutdown(grace=0)


async def test_a_failing_interceptor_answers_its_status_and_the_rest_never_runs() -> None:
    calls = Calls()

    async def deny(request: CheckRequest, ctx: ServerContext, handler: UnaryHandler) -> Message:
        if request.service == "secret":
            raise TtrpcError(Code.PERMISSION_DENIED, f"{ctx.method} denied: secret")
        return await handler(request, ctx)

    interceptors = [calls.interceptor("outer"), deny, calls.interceptor("inner")]
    server = Server([calls.service()], interceptors=interceptors)
    async with connected(server) as client:
        with pytest.raises(TtrpcError) as exc:
            await echo(client, "secret")
        assert (exc.value.code, exc.value.message) == (
            Code.PERMISSION_DENIED,
            "Echo denied: secret",
        )
        assert calls.log == ["outer before", "outer saw PERMISSION_DENIED"]
        # the connection goes on, and the next call passes the whole chain
        calls.log.clear()
        assert await echo(client, "open") == "open"
        assert calls.log == [
            "outer before",
            "inner before",
            "handler",
            "inner after",
            "outer after",
        ]
    await server.shutdown(grace=0)


async def test_an_interceptor_that_breaks_answers_internal_naming_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = Calls()

    async def broken(request: Message, ctx: ServerContext, handler: UnaryHandler) -> Message:
        raise KeyError("no such tenant")

    server = Server([calls.service()], interceptors=[broken])
    async with connected(server) as client:
        with pytest.raises(TtrpcError) as exc:
            await echo(client)
    await server.shutdown(grace=0)
    assert exc.value.code == Code.INTERNAL
    assert f"{SERVICE}/Echo" in exc.value.message and "no such tenant" in exc.value.message
    assert calls.log == []
    assert any("no such tenant" in r.getMessage() for r in caplog.records)


async def test_interceptors_see_the_calls_context() -> None:
    calls = Calls()
    seen: list[ServerContext] = []

    async def look(request: Message, ctx: ServerContext, handler: UnaryHandler) -> Message:
        seen.append(ctx)
        return await handler(request, ctx)

    server = Server([calls.service()], interceptors=[look])
    async with connected(server) as client:
        await echo(client, metadata={"traceparent": TRACEPARENT, "k": ["1", "2"]}, timeout=30)
        await echo(client)
    await server.shutdown(grace=0)
    first, second = seen
    assert (first.service, first.method) == (SERVICE, "Echo")
    assert first.metadata == {"traceparent": [TRACEPARENT], "k": ["1", "2"]}
    assert first.timeout == 30 and second.timeout is None
    assert (first.stream_id, second.stream_id) == (1, 3)
    assert first.peer == (os.getpid(), os.getuid(), os.getgid())
    assert calls.contexts == seen  # the handler gets the same context


async def test_the_deadline_covers_the_interceptors() -> None:
    calls = Calls()

    async def slow(request: Message, ctx: ServerContext, handler: UnaryHandler) -> Message:
        await asyncio.sleep(30)
        return await handler(request, ctx)

    server = Server([calls.service()], interceptors=[slow])
    async with connected(server) as client:
        with pytest.raises(TtrpcError) as exc:
            await call_with_server_deadline(client, SERVICE, "Echo", b"", 200_000_000)
    await server.shutdown(grace=0)
    assert exc.value.code == Code.DEADLINE_EXCEEDED and "0.2s deadline" in exc.value.message
    assert calls.log == []


async def test_stream_interceptors_wrap_streaming_calls_only() -> None:
    calls = Calls()

    async def counted(stream: ServerStream, ctx: ServerContext, handler: StreamHandler) -> Any:
        calls.log.append(f"stream interceptor {ctx.method}")
        if ctx.first("tenant") == "blocked":
            raise TtrpcError(Code.UNAUTHENTICATED, "tenant blocked")
        final = await handler(stream, ctx)
        return b"[" + (final or b"") + b"]"

    server = Server(
        [calls.service()], interceptors=[calls.interceptor("unary")], stream_interceptors=[counted]
    )
    async with connected(server) as client:
        stream = client.stream(SERVICE, "Sum")
        for n in (1, 2, 3):
            stream.send(str(n).encode())
        stream.close_send()
        assert await stream.response() == b"[total=6]"
        assert calls.log == ["stream interceptor Sum", "stream handler"]
        blocked = client.stream(SERVICE, "Sum", metadata={"tenant": "blocked"})
        blocked.close_send()
        with pytest.raises(TtrpcError) as exc:
            await blocked.response()
        assert exc.value.code == Code.UNAUTHENTICATED
        calls.log.clear()
        await echo(client)
        assert calls.log == ["unary before", "handler", "unary after"]
    await server.shutdown(grace=0)


async def test_client_interceptors_run_in_order_and_inject_metadata() -> None:
    calls = Calls()
    log: list[str] = []

    def adding(key: str, value: str) -> Any:
        async def add(request: Any, ctx: ClientContext, invoke: Invoker) -> Any:
            log.append(f"{key} before {sorted(ctx.metadata)}")
            ctx.metadata[key] = [value]
            response = await invoke(request, ctx)
            log.append(f"{key} after")
            return response

        return add

    server = Server([calls.service()])
    interceptors = [adding("traceparent", TRACEPARENT), adding("tracestate", "k=v")]
    async with connected(server, interceptors=interceptors) as client:
        # the server sees what the interceptors added, besides what the caller gave
        assert await echo(client, metadata={"given": "yes"}) == (
            f"given=yes,traceparent={TRACEPARENT},tracestate=k=v"
        )
        assert log == [
            "traceparent before ['given']",
            "tracestate before ['given', 'traceparent']",
            "tracestate after",
            "traceparent after",
        ]
        # raw calls pass the chain too, with the payload as bytes
        log.clear()
        raw = await client.call_raw(SERVICE, "Echo", b"")
        assert CheckRequest.FromString(raw).service == (f"traceparent={TRACEPARENT},tracestate=k=v")
        assert log[0] == "traceparent before []"
        # the list may change between calls
        client.interceptors.clear()
        assert await echo(client, "bare") == "bare"
    await server.shutdown(grace=0)


async def test_a_client_interceptor_may_fail_a_call_before_it_is_sent() -> None:
    calls = Calls()
    seen: list[tuple[str, Code]] = []

    async def refuse(request: Any, ctx: ClientContext, invoke: Invoker) -> Any:
        if ctx.timeout is None:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"{ctx.method}: calls need a deadline")
        return await invoke(request, ctx)

    async def watch(request: Any, ctx: ClientContext, invoke: Invoker) -> Any:
        try:
            return await invoke(request, ctx)
        except TtrpcError as exc:
            seen.append((ctx.method, exc.code))
            raise

    server = Server([calls.service()])
    async with connected(server, interceptors=[watch, refuse]) as client:
        with pytest.raises(TtrpcError) as exc:
            await echo(client)
        assert exc.value.code == Code.FAILED_PRECONDITION
        assert calls.log == []  # never sent
        assert await echo(client, "ok", timeout=5) == "ok"
        # an error from the server reaches the interceptors as the caller gets it
        with pytest.raises(TtrpcError):
            await client.call("no.Such", "Thing", CheckRequest(), CheckRequest, timeout=5)
    await server.shutdown(grace=0)
    assert seen == [("Echo", Code.FAILED_PRECONDITION), ("Thing", Code.INVALID_ARGUMENT)]


# --- the agent's interceptors and kata-agent-ctl's ----------------------------------


class SpanListener:
    """A unix socket taking span records, as kata-trace-forwarder would; decoded at the end."""

    def __init__(self, path: Path) -> None:
        self.address = f"unix://{path}"
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._data = bytearray()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._sock.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                self._data += chunk

    def spans(self) -> list[OtlpSpan]:
        """The spans received (once the exporter has stopped)."""
        self._thread.join(5)
        self._sock.close()
        spans: list[OtlpSpan] = []
        for payload in otlp.RecordDecoder().feed(bytes(self._data)):
            assert isinstance(payload, bytes)
            request = otlp.decode_request(payload)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    spans.extend(scope.spans)
        return spans


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[SpanListener]:
    yield SpanListener(tmp_path / "spans.sock")


async def test_agent_rpc_spans_hold_the_policy_decision_and_the_steps(
    listener: SpanListener,
) -> None:
    """The agent's chain: the RPC's span (a child of the caller's traceparent, else of the
    root), inside which the policy decides and the handler's steps are children."""
    from pykata.agent import interceptors, tracing
    from pykata.agent.policy import Enforcer
    from pykata.agent.traceprovider import TraceProvider

    Pause = agent_pb2.PauseContainerRequest

    async def pause(request: Any, ctx: ServerContext) -> Message:
        with tracing.step("runtime pause", {"container_id": request.container_id}):
            return Pause()

    enforcer = Enforcer()
    enforcer.replace(
        '[[rules]]\nname = "keep c9"\nmethods = ["PauseContainer"]\ndecision = "deny"\n'
        'when = { container_id = ["c9"] }\n',
        "test",
    )
    provider = TraceProvider(listener.address)
    server = Server(
        [Service("grpc.AgentService", {"PauseContainer": UnaryMethod(Pause, pause)})],
        interceptors=[
            interceptors.rpc_spans(provider.tracer, provider.root_context),
            interceptors.policy(enforcer),
        ],
    )
    try:
        async with connected(server) as client:
            meta = {"traceparent": TRACEPARENT}
            await client.call(
                "grpc.AgentService",
                "PauseContainer",
                Pause(container_id="c1"),
                Pause,
                metadata=meta,
            )
            with pytest.raises(TtrpcError) as exc:
                await client.call(
                    "grpc.AgentService", "PauseContainer", Pause(container_id="c9"), Pause
                )
            assert exc.value.code == Code.PERMISSION_DENIED and "keep c9" in exc.value.message
    finally:
        await server.shutdown(grace=0)
        provider.stop(timeout=5)
    spans = listener.spans()
    assert sorted(s.name for s in spans) == [
        "PauseContainer",
        "PauseContainer",
        "kata-agent",
        "runtime pause",
    ]
    (root,) = [s for s in spans if s.name == "kata-agent"]
    (step,) = [s for s in spans if s.name == "runtime pause"]
    allowed, denied = sorted(
        (s for s in spans if s.name == "PauseContainer"), key=lambda s: s.start_time_unix_nano
    )
    assert allowed.kind == otlp.SERVER and allowed.trace_id.hex() == TRACE_ID
    assert allowed.parent_span_id.hex() == PARENT_SPAN
    assert attributes(allowed)["container_id"] == "c1"
    assert attributes(allowed)["rpc.method"] == "PauseContainer"
    assert allowed.status.code != otlp.STATUS_ERROR
    assert step.parent_span_id == allowed.span_id and step.trace_id == allowed.trace_id
    # denied: no traceparent, so a child of the root; failed, with the error the caller got
    assert denied.parent_span_id == root.span_id
    assert denied.status.code == otlp.STATUS_ERROR and "keep c9" in denied.status.message
    assert [e.name for e in denied.events] == ["exception"]
    assert attributes(denied)["container_id"] == "c9"


async def test_ctl_tracing_interceptor_sends_the_calls_span_as_traceparent(
    listener: SpanListener,
) -> None:
    from pykata.ctl.tracing import ClientTracing

    calls = Calls()
    tracing = ClientTracing(listener.address, "unix:///agent.sock")
    server = Server([calls.service()])
    try:
        async with connected(server, interceptors=[tracing.intercept]) as client:
            with tracing.command("Echo", "Echo service=x"):
                sent = await echo(client)
            with pytest.raises(TtrpcError):
                await client.call("no.Such", "Thing", CheckRequest(), CheckRequest)
    finally:
        await server.shutdown(grace=0)
        tracing.stop(failed=False)
    spans = {s.name: s for s in listener.spans()}
    call, command, run = spans[f"{SERVICE}/Echo"], spans["Echo"], spans["kata-agent-ctl"]
    # the server got the call's own span as its parent: traceparent version-trace-span-flags
    assert sent == f"traceparent=00-{call.trace_id.hex()}-{call.span_id.hex()}-01"
    assert call.kind == otlp.CLIENT and call.parent_span_id == command.span_id
    assert command.parent_span_id == run.span_id and run.trace_id == call.trace_id
    assert attributes(call)["rpc.grpc.status_code"] == 0
    failed = spans["no.Such/Thing"]
    assert failed.parent_span_id == run.span_id  # outside any command line: the run's child
    assert attributes(failed)["rpc.grpc.status_code"] == Code.INVALID_ARGUMENT
    assert failed.status.code == otlp.STATUS_ERROR
    assert failed.status.message.startswith("INVALID_ARGUMENT: unknown service no.Such")


def attributes(span: OtlpSpan) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind) if kind else None
    return values
