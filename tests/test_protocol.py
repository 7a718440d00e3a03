"""Server and client connection rules, sans-IO: the reference server's answers to bad input."""

from __future__ import annotations

import pytest
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import strategies as st

from pykata.ttrpc.frame import (
    MAX_DATA_SIZE,
    Flags,
    FrameDecoder,
    FrameTooLarge,
    MessageType,
    encode_frame,
)
from pykata.ttrpc.protocol import (
    ClientConnection,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    StreamRejected,
)
from pykata.ttrpc.status import Code
from pykata.ttrpc.ttrpc_pb2 import Request, Response


def request_frame(sid: int, flags: int = 0, **fields: object) -> bytes:
    body = Request(service="grpc.Health", method="Check", **fields).SerializeToString()  # type: ignore[arg-type]
    return encode_frame(sid, MessageType.REQUEST, flags, body)


def test_valid_request_with_metadata_and_timeout() -> None:
    conn = ServerConnection()
    metadata = [{"key": "traceparent", "value": "00-abc-def-01"}]
    [event] = conn.receive(request_frame(1, timeout_nano=5, metadata=metadata))
    assert isinstance(event, RequestReceived)
    assert event.request.timeout_nano == 5
    assert event.request.metadata[0].value == "00-abc-def-01"
    assert not event.streaming


def test_even_stream_id_is_rejected_and_connection_goes_on() -> None:
    conn = ServerConnection()
    [rejected, accepted] = conn.receive(request_frame(2) + request_frame(3))
    assert rejected == StreamRejected(2, Code.INVALID_ARGUMENT, "stream id 2 must be odd")
    assert isinstance(accepted, RequestReceived) and accepted.stream_id == 3


def test_reused_or_decreasing_stream_id_is_rejected() -> None:
    conn = ServerConnection()
    events = conn.receive(request_frame(5) + request_frame(5) + request_frame(3) + request_frame(7))
    assert [type(e) for e in events] == [
        RequestReceived,
        StreamRejected,
        StreamRejected,
        RequestReceived,
    ]
    assert isinstance(events[1], StreamRejected)
    assert "cannot be re-used and must increment" in events[1].message


def test_undecodable_request_is_invalid_argument() -> None:
    conn = ServerConnection()
    [event] = conn.receive(encode_frame(1, MessageType.REQUEST, 0, b"\xff\xff\xff"))
    assert isinstance(event, StreamRejected)
    assert event.code == Code.INVALID_ARGUMENT
    assert event.message.startswith("unmarshal request error")


def test_data_for_inactive_stream_and_close_with_data_are_rejected() -> None:
    conn = ServerConnection()
    events = conn.receive(
        encode_frame(9, MessageType.DATA, 0, b"x")  # nothing open
        + request_frame(1, Flags.REMOTE_OPEN)
        + encode_frame(1, MessageType.DATA, 0, b"one")
        + encode_frame(1, MessageType.DATA, Flags.REMOTE_CLOSED, b"two")  # close must be empty
    )
    assert isinstance(events[0], StreamRejected) and "inactive stream 9" in events[0].message
    assert isinstance(events[1], RequestReceived) and events[1].streaming
    assert events[2] == DataReceived(1, b"one", False)
    assert isinstance(events[3], StreamRejected)
    assert events[3].message == "data close message cannot include data"


def test_no_data_flag_and_empty_message_are_different() -> None:
    conn = ServerConnection()
    events = conn.receive(
        request_frame(1, Flags.REMOTE_OPEN)
        + encode_frame(1, MessageType.DATA, 0, b"")
        + encode_frame(1, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"")
    )
    assert events[1:] == [DataReceived(1, b"", False), DataReceived(1, None, True)]


def test_unknown_message_type_is_ignored() -> None:
    conn = ServerConnection()
    events = conn.receive(encode_frame(1, 0x7F, 0, b"future") + request_frame(1))
    assert [type(e) for e in events] == [RequestReceived]


def test_client_allocates_odd_increasing_ids_and_reads_responses() -> None:
    client = ClientConnection()
    ids = [client.request("s", "m", b"")[0] for _ in range(3)]
    assert ids == [1, 3, 5]
    response = Response(status={"code": Code.NOT_FOUND, "message": "no container abc"})
    [event] = client.receive(encode_frame(3, MessageType.RESPONSE, 0, response.SerializeToString()))
    assert isinstance(event, ResponseReceived)
    assert (event.stream_id, event.status.code, event.status.message) == (3, 5, "no container abc")


def test_server_response_frames_decode_on_the_client() -> None:
    server = ServerConnection()
    data = server.response(1, Response().status, b"payload") + server.data(1, None, True)
    frames = FrameDecoder().feed(data)
    assert [f.type for f in frames] == [MessageType.RESPONSE, MessageType.DATA]
    assert Response.FromString(frames[0].data).payload == b"payload"
    assert frames[1].flags == Flags.REMOTE_CLOSED | Flags.NO_DATA


OK = status_pb2.Status(code=Code.OK)

# The calls-in-flight bound: a pure rule of the connection, so any interleaving
# of requests (good, re-used, even ids) and answers can be checked without sockets.
ops = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.integers(0, 3)),  # 0: next odd id, else a re-used/even id
        st.tuples(st.just("answer"), st.integers(0, 1000)),  # answer the n-th open call
    ),
    max_size=200,
)


@given(st.integers(1, 8), ops)
def test_calls_in_flight_never_exceed_the_limit_and_every_excess_is_refused(
    limit: int, script: list[tuple[str, int]]
) -> None:
    conn = ServerConnection(max_streams=limit)
    open_calls: list[int] = []
    next_id = 1
    for op, n in script:
        if op == "answer":
            if open_calls:
                conn.response(open_calls.pop(n % len(open_calls)), OK)
            continue
        new = n == 0 or next_id == 1
        if new:
            sid, next_id = next_id, next_id + 2
        else:  # a re-used id (must not free the call it names) or an even one
            sid = next_id - 2 if n == 1 else 2 * n
        full = len(open_calls) == limit
        [event] = conn.receive(request_frame(sid))
        if new and not full:
            assert isinstance(event, RequestReceived)
            open_calls.append(sid)
        else:
            assert isinstance(event, StreamRejected)
            exhausted = event.code == Code.RESOURCE_EXHAUSTED
            assert exhausted == new
            assert not exhausted or event.message.endswith(f"(limit {limit})")
            conn.rejection(event)  # answering a rejection frees nothing
        assert conn.open_streams == len(open_calls) <= limit


def test_a_rejected_reused_id_keeps_the_call_it_names_counted() -> None:
    conn = ServerConnection(max_streams=1)
    [first] = conn.receive(request_frame(1))
    [reused] = conn.receive(request_frame(1))
    assert isinstance(first, RequestReceived) and isinstance(reused, StreamRejected)
    conn.rejection(reused)
    [refused] = conn.receive(request_frame(3))
    assert isinstance(refused, StreamRejected) and refused.code == Code.RESOURCE_EXHAUSTED
    conn.response(1, OK)
    [accepted] = conn.receive(request_frame(5))
    assert isinstance(accepted, RequestReceived)


def test_events_wait_in_the_connection_until_taken() -> None:
    conn = ServerConnection()
    conn.receive_data(request_frame(1) + request_frame(3) + request_frame(5)[:7])
    assert conn.buffered > 0
    first, second = conn.next_event(), conn.next_event()
    assert isinstance(first, RequestReceived) and isinstance(second, RequestReceived)
    assert conn.next_event() is None and conn.in_frame() and conn.buffered == 7


def _open_stream(conn: ServerConnection, sid: int) -> None:
    [event] = conn.receive(request_frame(sid))
    assert isinstance(event, RequestReceived)


@given(
    st.lists(
        st.one_of(st.binary(max_size=300), st.integers(0, 200_000).map(lambda n: b"x" * n)),
        max_size=3,
    ),
    st.integers(1, 1000).map(lambda n: 2 * n + 1),
)
def test_successful_responses_are_the_bytes_protobuf_writes(parts: list[bytes], sid: int) -> None:
    """The hand-encoded OK response (payload pieces written as they are) is
    byte for byte what a Response message serializes to, pieces joined."""
    conn = ServerConnection()
    _open_stream(conn, sid)
    ok = status_pb2.Status(code=Code.OK)
    written = b"".join(conn.response_parts(sid, ok, parts))
    body = Response(status=ok, payload=b"".join(parts)).SerializeToString()
    assert written == encode_frame(sid, MessageType.RESPONSE, Flags.NONE, body)
    [answer] = ClientConnection().receive(written)
    assert isinstance(answer, ResponseReceived)
    assert (answer.stream_id, answer.status.code) == (sid, Code.OK)
    assert answer.payload == b"".join(parts)


def test_a_successful_response_too_big_for_a_frame_is_refused() -> None:
    conn = ServerConnection()
    _open_stream(conn, 1)
    ok = status_pb2.Status(code=Code.OK)
    with pytest.raises(FrameTooLarge):
        conn.response_parts(1, ok, [b"x" * MAX_DATA_SIZE])
