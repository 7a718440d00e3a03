"""ttRPC framing, sans-IO: bytes in, frames out; frames in, bytes out.

Every message is a 10-byte header (data length u32 BE, stream id u32 BE,
message type u8, flags u8) followed by the data. Nothing here touches a
socket, so the decoder can be fed arbitrary bytes in tests and fuzzers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
#: Largest data length either side accepts or sends (the reference value).
MAX_DATA_SIZE = 4 << 20
#: A frame's data this big is read in place (FrameDecoder.get_buffer), not joined.
IN_PLACE_SIZE = 64 << 10
#: What one read takes outside such a frame.
READ_SIZE = 256 << 10


# Plain int constants, not enums: they are tested on every frame and enum
# operators cost more than the rest of the decoding.
class MessageType:
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags:
    NONE = 0
    #: The sender of this frame sends no more data on the stream.
    REMOTE_CLOSED = 0x01
    #: Request only: a streaming request, data frames follow.
    REMOTE_OPEN = 0x02
    #: Data only: the frame carries no payload (an empty frame without this
    #: flag is a real, empty message).
    NO_DATA = 0x04


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    #: (A bytearray when the frame was read in place: the same bytes, not copied.)
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizeFrame:
    """A header announced more than MAX_DATA_SIZE bytes; the data is skipped."""

    stream_id: int
    type: int
    flags: int
    length: int


class FrameTooLarge(ValueError):
    """Raised when asked to encode data larger than MAX_DATA_SIZE."""


def encode_frame(stream_id: int, type: int, flags: int, data: bytes) -> bytes:
    if len(data) > MAX_DATA_SIZE:
        raise FrameTooLarge(
            f"message length {len(data)} exceeds maximum message size of {MAX_DATA_SIZE}"
        )
    return HEADER.pack(len(data), stream_id, type, flags) + data


def varint(value: int) -> bytes:
    """`value` (not negative) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class FrameDecoder:
    """Turns a byte stream into Frame and OversizeFrame events, one at a time.

    push() takes bytes as they arrive; next_frame() returns the next whole
    frame, or None until more bytes come (as h11's next_event). A caller that
    wants to stop taking requests simply stops asking: the bytes wait here,
    counted by `buffered`. An incomplete frame's chunks are kept as a list and
    joined once the frame is whole (no quadratic copying of big frames).
    Oversize data is never buffered: its bytes are counted off as they arrive,
    so a hostile length costs no memory and the stream stays in sync.

    A reader may instead ask get_buffer() where to read to and report with
    buffer_updated(): a big frame's data is then read straight into the
    buffer it is handed out in, each byte copied once (asyncio's
    BufferedProtocol).
    """

    def __init__(self) -> None:
        self._buf = b""  # input not decoded yet, from _pos on
        self._pos = 0
        self._chunks: list[bytes] = []  # input after _buf, joined only when it can help
        self._held = 0  # undecoded bytes in _buf (from _pos) and _chunks
        self._needed = HEADER_SIZE  # bytes that must be held before a frame can come out
        self._skip = 0  # bytes of an oversize frame still to drop
        #: Frames (and oversize headers) decoded so far: a frame's identity for deadlines.
        self.frames = 0
        self._scratch: bytearray | None = None  # where get_buffer() reads to outside big frames
        self._in_place: bytearray | None = None  # a big frame's data, read to in place
        self._in_place_header: tuple[int, int, int] = (0, 0, 0)
        self._in_place_filled = 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes read should go; say how many came with buffer_updated()."""
        if self._in_place is None and self._needed - HEADER_SIZE >= IN_PLACE_SIZE:
            self._read_in_place()
        if self._in_place is not None:
            return memoryview(self._in_place)[self._in_place_filled :]
        if self._scratch is None:
            self._scratch = bytearray(READ_SIZE)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were read into the last get_buffer()."""
        if self._in_place is not None:
            self._in_place_filled += nbytes
            self._held += nbytes
            return
        assert self._scratch is not None
        read = memoryview(self._scratch)[:nbytes]
        if not self._held and not self._skip and self._begins_big_frame(read):
            # The usual way into a big frame: its header and first bytes, read
            # at a frame boundary, go straight to its own buffer.
            self._held = nbytes
            self._begin_in_place(read)
        else:
            self.push(bytes(read))

    @staticmethod
    def _begins_big_frame(read: memoryview) -> bool:
        """Whether `read` starts a frame to read in place that it does not finish."""
        if len(read) < HEADER_SIZE:
            return False
        length: int = HEADER.unpack_from(read)[0]
        return IN_PLACE_SIZE <= length <= MAX_DATA_SIZE and len(read) < HEADER_SIZE + length

    def _read_in_place(self) -> None:
        """The big frame begun (pushed) gets its own data buffer."""
        held = self._buf[self._pos :] + b"".join(self._chunks)
        self._buf, self._pos = b"", 0
        self._chunks.clear()
        self._begin_in_place(memoryview(held))

    def _begin_in_place(self, begun: memoryview) -> None:
        """Read the frame whose header and first bytes are `begun` into its own buffer."""
        length, stream_id, type_, flags = HEADER.unpack_from(begun)
        self._in_place = bytearray(length)
        self._in_place[: len(begun) - HEADER_SIZE] = begun[HEADER_SIZE:]
        self._in_place_filled = len(begun) - HEADER_SIZE
        self._in_place_header = (stream_id, type_, flags)
        self._needed = HEADER_SIZE + length

    def _in_place_frame(self) -> Frame | None:
        data = self._in_place
        assert data is not None
        if self._in_place_filled < len(data):
            return None
        self._in_place = None
        self._consumed(0)
        return Frame(*self._in_place_header, data)  # type: ignore[arg-type]

    def push(self, data: bytes) -> None:
        if self._in_place is not None:
            # (Bytes pushed, not read in place, while a frame is: they finish it first.)
            take = min(len(data), len(self._in_place) - self._in_place_filled)
            self._in_place[self._in_place_filled : self._in_place_filled + take] = data[:take]
            self._in_place_filled += take
            self._held += take
            data = data[take:]
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if data:
            self._chunks.append(data)
            self._held += len(data)

    def next_frame(self) -> Frame | OversizeFrame | None:
        if self._in_place is not None:
            frame = self._in_place_frame()
            if frame is not None:  # what was pushed after it is decoded from the next call on
                self._held = sum(map(len, self._chunks))
            return frame
        if self._held < self._needed:
            return None
        if self._chunks:
            rest = self._buf[self._pos :]
            self._buf = rest + b"".join(self._chunks) if rest else b"".join(self._chunks)
            self._pos = 0
            self._chunks.clear()
        buf, pos = self._buf, self._pos
        length, stream_id, type_, flags = HEADER.unpack_from(buf, pos)
        start = pos + HEADER_SIZE
        if length > MAX_DATA_SIZE:
            dropped = min(length, len(buf) - start)
            self._skip = length - dropped
            self._consumed(start + dropped)
            return OversizeFrame(stream_id, type_, flags, length)
        end = start + length
        if end > len(buf):
            self._needed = HEADER_SIZE + length
            return None
        self._consumed(end)
        return Frame(stream_id, type_, flags, buf[start:end])

    def _consumed(self, pos: int) -> None:
        self.frames += 1
        self._needed = HEADER_SIZE
        self._held = len(self._buf) - pos
        if self._held:
            self._pos = pos
        else:
            self._buf, self._pos = b"", 0

    def feed(self, data: bytes) -> list[Frame | OversizeFrame]:
        """push() then every frame that is now whole."""
        self.push(data)
        events: list[Frame | OversizeFrame] = []
        while (event := self.next_frame()) is not None:
            events.append(event)
        return events

    @property
    def buffered(self) -> int:
        """Bytes held in memory: whole frames not taken yet, and an incomplete one."""
        return self._held

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (or still to skip)."""
        return self._held + self._skip

    @property
    def frame_size(self) -> int:
        """Header and data of the frame begun, once its header is in; else 0.
        (After next_frame() returned None; an oversize frame's is 0: never held.)"""
        return self._needed if 0 < self._held < self._needed > HEADER_SIZE else 0

    def in_frame(self) -> bool:
        """True when a frame has started and the bytes held cannot finish it."""
        return self._skip > 0 or 0 < self._held < self._needed

    def at_frame_boundary(self) -> bool:
        """True when end of stream here would cut no frame short."""
        return self.pending == 0
