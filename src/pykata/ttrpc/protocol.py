"""ttRPC connection state machines, sans-IO.

ServerConnection and ClientConnection each take received bytes and return
events, and turn outgoing messages into bytes. They enforce the wire rules
(odd, increasing client stream ids; data only on open streams; size limit)
the way the reference Go implementation does: a bad stream is answered with
a status and the connection goes on; only a frame cut short by the end of
input ends a connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from .frame import (
    HEADER,
    MAX_DATA_SIZE,
    Flags,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    MessageType,
    OversizeFrame,
    encode_frame,
    varint,
)
from .status import Code
from .ttrpc_pb2 import KeyValue, Request, Response

# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    request: Request
    #: The client will send data frames on this stream (flag remote-open).
    streaming: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    #: None when the frame had the no-data flag.
    data: bytes | None
    #: The peer sends nothing more on this stream.
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """The peer broke a rule on one stream; the server answers it with this status."""

    stream_id: int
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    stream_id: int
    status: status_pb2.Status
    payload: bytes


ServerEvent = RequestReceived | DataReceived | StreamRejected
ClientEvent = ResponseReceived | DataReceived
E = TypeVar("E", ServerEvent, ClientEvent)


def oversize_message(length: int) -> str:
    return f"message length {length} exceeds maximum message size of {MAX_DATA_SIZE}"


def _data_frame(stream_id: int, data: bytes | None, end_stream: bool) -> bytes:
    flags = Flags.REMOTE_CLOSED if end_stream else Flags.NONE
    if data is None:
        flags |= Flags.NO_DATA
    return encode_frame(stream_id, MessageType.DATA, flags, data or b"")


def data_frame_header(stream_id: int, length: int) -> bytes:
    """The header of a data frame carrying `length` payload bytes."""
    if length > MAX_DATA_SIZE:
        raise FrameTooLarge(oversize_message(length))
    return HEADER.pack(length, stream_id, MessageType.DATA, Flags.NONE)


def data_frame_parts(stream_id: int, head: bytes, data: bytes) -> list[bytes]:
    """A data frame whose payload is `head` then `data`, as pieces to write in order:
    a big `data` is not joined to the rest (not copied)."""
    header = data_frame_header(stream_id, len(head) + len(data))
    if len(data) < BIG_PAYLOAD:
        return [b"".join((header, head, data))]
    return [header + head, data]


class _Receiving(Generic[E]):
    """Frames in, events out; each side says what a frame means to it.

    h11-style: receive_data() takes bytes, next_event() hands out one event
    at a time (None: more bytes needed). receive() does both for callers that
    take every event at once.
    """

    def __init__(self) -> None:
        self._decoder = FrameDecoder()

    def receive_data(self, data: bytes) -> None:
        self._decoder.push(data)

    def get_buffer(self) -> memoryview:
        """Where to read the next bytes to, in place of receive_data (then buffer_updated)."""
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._decoder.buffer_updated(nbytes)

    def next_event(self) -> E | None:
        while (frame := self._decoder.next_frame()) is not None:
            event = self._handle(frame)
            if event is not None:
                return event
        return None

    def receive(self, data: bytes) -> list[E]:
        self._decoder.push(data)
        events: list[E] = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    @property
    def buffered(self) -> int:
        """Received bytes held: events not taken yet, and an incomplete frame."""
        return self._decoder.buffered

    @property
    def frames(self) -> int:
        """Frames decoded so far (a frame's identity, for deadlines)."""
        return self._decoder.frames

    @property
    def frame_size(self) -> int:
        """After next_event() returned None: the size of the frame begun, once known."""
        return self._decoder.frame_size

    def in_frame(self) -> bool:
        """After next_event() returned None: a frame has started and is not complete."""
        return self._decoder.in_frame()

    def end_of_input_is_clean(self) -> bool:
        """False when the input ended in the middle of a frame."""
        return self._decoder.at_frame_boundary()

    def _handle(self, frame: Frame | OversizeFrame) -> E | None:
        raise NotImplementedError


# --- server side ------------------------------------------------------------


class ServerConnection(_Receiving[ServerEvent]):
    """The server's side of one connection.

    `max_streams` bounds the calls in flight: a request beyond it is answered
    RESOURCE_EXHAUSTED and the connection goes on (a client whose long-poll
    calls hold every slot can still make the calls that end them).
    """

    def __init__(self, max_streams: int | None = None) -> None:
        super().__init__()
        self.max_streams = max_streams
        self._last_stream_id = 0
        #: Streams accepted and not answered yet.
        self._open: set[int] = set()
        #: Streams on which the client may still send data frames.
        self._receiving: set[int] = set()

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def _handle(self, frame: Frame | OversizeFrame) -> ServerEvent | None:
        sid = frame.stream_id
        if isinstance(frame, OversizeFrame):
            return StreamRejected(sid, Code.RESOURCE_EXHAUSTED, oversize_message(frame.length))
        if frame.type == MessageType.REQUEST:
            return self._handle_request(frame)
        if frame.type == MessageType.DATA:
            return self._handle_data(frame)
        return None  # unknown (or misdirected) types are ignored, as the reference does

    def _handle_request(self, frame: Frame) -> ServerEvent:
        sid = frame.stream_id
        if sid % 2 == 0:
            return StreamRejected(sid, Code.INVALID_ARGUMENT, f"stream id {sid} must be odd")
        if sid <= self._last_stream_id:
            return StreamRejected(
                sid,
                Code.INVALID_ARGUMENT,
                f"stream id {sid} cannot be re-used and must increment "
                f"(last was {self._last_stream_id})",
            )
        self._last_stream_id = sid
        if self.max_streams is not None and len(self._open) >= self.max_streams:
            return StreamRejected(
                sid,
                Code.RESOURCE_EXHAUSTED,
                f"too many calls in flight on this connection (limit {self.max_streams})",
            )
        request = Request()
        try:
            request.ParseFromString(frame.data)
        except DecodeError as exc:
            return StreamRejected(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        streaming = bool(frame.flags & Flags.REMOTE_OPEN)
        if streaming:
            self._receiving.add(sid)
        self._open.add(sid)
        return RequestReceived(sid, request, streaming)

    def _handle_data(self, frame: Frame) -> ServerEvent:
        sid = frame.stream_id
        if sid not in self._receiving:
            return StreamRejected(
                sid, Code.INVALID_ARGUMENT, f"data frame for inactive stream {sid}"
            )
        end = bool(frame.flags & Flags.REMOTE_CLOSED)
        no_data = bool(frame.flags & Flags.NO_DATA)
        if end and frame.data:
            self._receiving.discard(sid)
            return StreamRejected(
                sid, Code.INVALID_ARGUMENT, "data close message cannot include data"
            )
        if end:
            self._receiving.discard(sid)
        return DataReceived(sid, None if no_data else frame.data, end)

    def response(self, stream_id: int, status: status_pb2.Status, payload: bytes = b"") -> bytes:
        """Bytes of the response that ends a stream."""
        return b"".join(self.response_parts(stream_id, status, (payload,)))

    def response_parts(
        self, stream_id: int, status: status_pb2.Status, payload: Sequence[bytes]
    ) -> list[bytes]:
        """The response that ends a stream, as pieces to write in order.

        `payload` comes in pieces too; a successful response keeps them as they
        are (a big payload, such as a megabyte of output, is never copied here).
        """
        self._receiving.discard(stream_id)
        self._open.discard(stream_id)
        if status.code or status.message or len(status.details):
            body = Response(status=status, payload=b"".join(payload)).SerializeToString()
            return [encode_frame(stream_id, MessageType.RESPONSE, Flags.NONE, body)]
        return _ok_response(stream_id, payload)

    def rejection(self, event: StreamRejected) -> bytes:
        """Bytes answering a rejected stream. A call already running on that id
        (a re-used id) stays open: it is still counted until its own response."""
        status = status_pb2.Status(code=event.code, message=event.message)
        body = Response(status=status).SerializeToString()
        return encode_frame(event.stream_id, MessageType.RESPONSE, Flags.NONE, body)

    def data(self, stream_id: int, data: bytes | None, end_stream: bool = False) -> bytes:
        return _data_frame(stream_id, data, end_stream)


#: Payloads this big are written as they are, not joined into one piece with the header.
BIG_PAYLOAD = 64 << 10
#: Response.status = Status(code=OK), as protobuf encodes it: field 1, empty.
_OK_STATUS = b"\x0a\x00"
#: Response.payload's tag: field 2, length-delimited.
_PAYLOAD_TAG = b"\x12"


def _ok_response(stream_id: int, payload: Sequence[bytes]) -> list[bytes]:
    """A successful Response frame, encoded here rather than by protobuf, which
    would copy the payload into a message and out again. The bytes are those
    protobuf writes."""
    size = len(payload[0]) if len(payload) == 1 else sum(map(len, payload))
    head = _OK_STATUS + _PAYLOAD_TAG + varint(size) if size else _OK_STATUS
    length = len(head) + size
    if length > MAX_DATA_SIZE:
        raise FrameTooLarge(
            f"message length {length} exceeds maximum message size of {MAX_DATA_SIZE}"
        )
    header = HEADER.pack(length, stream_id, MessageType.RESPONSE, Flags.NONE)
    if size < BIG_PAYLOAD:
        return [b"".join((header, head, *payload))]
    return [header + head, *payload]


# --- client side ------------------------------------------------------------


class ClientConnection(_Receiving[ClientEvent]):
    def __init__(self) -> None:
        super().__init__()
        self._next_stream_id = 1

    def request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
        streaming: bool = False,
    ) -> tuple[int, bytes]:
        """Allocate the next stream id; return it and the request frame's bytes.

        Raises FrameTooLarge (and allocates nothing) if the request is too big.
        """
        request = Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=timeout_nano,
            metadata=[KeyValue(key=k, value=v) for k, v in metadata],
        )
        flags = Flags.REMOTE_OPEN if streaming else Flags.NONE
        sid = self._next_stream_id
        data = encode_frame(sid, MessageType.REQUEST, flags, request.SerializeToString())
        self._next_stream_id += 2
        return sid, data

    def data(self, stream_id: int, data: bytes | None, end_stream: bool = False) -> bytes:
        return _data_frame(stream_id, data, end_stream)

    def _handle(self, frame: Frame | OversizeFrame) -> ClientEvent | None:
        sid = frame.stream_id
        if isinstance(frame, OversizeFrame):
            status = status_pb2.Status(
                code=Code.RESOURCE_EXHAUSTED, message=oversize_message(frame.length)
            )
            return ResponseReceived(sid, status, b"")
        if frame.type == MessageType.RESPONSE:
            response = Response()
            try:
                response.ParseFromString(frame.data)
            except DecodeError as exc:
                status = status_pb2.Status(
                    code=Code.INTERNAL, message=f"unmarshal response error: {exc}"
                )
                return ResponseReceived(sid, status, b"")
            return ResponseReceived(sid, response.status, response.payload)
        if frame.type == MessageType.DATA:
            no_data = bool(frame.flags & Flags.NO_DATA)
            end = bool(frame.flags & Flags.REMOTE_CLOSED)
            return DataReceived(sid, None if no_data else frame.data, end)
        return None
