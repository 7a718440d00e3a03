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


class FrameDecoder:
    """Turns a byte stream into Frame and OversizeFrame events.

    An incomplete frame's chunks are kept as a list and joined once the
    frame is whole (no quadratic copying of big frames). Oversize data is
    never buffered: its bytes are counted off as they arrive, so a hostile
    length costs no memory and the stream stays in sync.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._held = 0  # bytes in _chunks
        self._needed = 0  # bytes _chunks must reach before decoding can progress
        self._skip = 0  # bytes of an oversize frame still to drop

    def feed(self, data: bytes) -> list[Frame | OversizeFrame]:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if self._chunks:
            self._chunks.append(data)
            self._held += len(data)
            if self._held < self._needed:
                return []
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._held = 0
        events: list[Frame | OversizeFrame] = []
        offset = 0
        end = len(data)
        length = 0
        while end - offset >= HEADER_SIZE:
            length, stream_id, type_, flags = HEADER.unpack_from(data, offset)
            start = offset + HEADER_SIZE
            if length > MAX_DATA_SIZE:
                events.append(OversizeFrame(stream_id, type_, flags, length))
                dropped = min(length, end - start)
                self._skip = length - dropped
                offset = start + dropped
                continue
            if end - start < length:
                break
            offset = start + length
            events.append(Frame(stream_id, type_, flags, data[start:offset]))
        if offset < end:
            rest = data[offset:]
            self._chunks.append(rest)
            self._held = len(rest)
            self._needed = HEADER_SIZE + length if len(rest) >= HEADER_SIZE else HEADER_SIZE
        return events

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (or still to skip)."""
        return self._held + self._skip

    def at_frame_boundary(self) -> bool:
        """True when end of stream here would cut no frame short."""
        return self.pending == 0
