"""Where a new ttRPC client starts in one byte stream that many clients share in turn (sans-IO).

A virtio-serial port has no connections: host clients follow one another on
one stream, and the guest often cannot see one leave and the next arrive
(both happen between two reads). The bytes tell: ttRPC clients number their
streams from 1, so a request on stream 1 after other requests is a new
client's first. The server hands this finder to the transport, which knows
no protocol.
"""

from __future__ import annotations

from .frame import HEADER, HEADER_SIZE, MessageType


class ClientBoundaries:
    """Cuts the bytes from a port's host side where a new ttRPC client starts.

    `feed` returns pieces (new_client, bytes): new_client is True where a
    client starts after another. Bytes of a header not yet complete are held
    back, so a cut never falls inside a frame.
    """

    def __init__(self) -> None:
        self._held = b""
        self._body_left = 0
        self._requests = 0

    def feed(self, data: bytes) -> list[tuple[bool, bytes]]:
        data = self._held + data
        pieces: list[tuple[bool, bytes]] = []
        start = offset = 0
        new_client = False
        while offset < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - offset)
                offset += step
                self._body_left -= step
                continue
            if len(data) - offset < HEADER_SIZE:
                break
            length, stream_id, type_, _ = HEADER.unpack_from(data, offset)
            if type_ == MessageType.REQUEST:
                if stream_id == 1 and self._requests:
                    if offset > start:
                        pieces.append((new_client, data[start:offset]))
                    start, new_client = offset, True
                self._requests += 1
            offset += HEADER_SIZE
            self._body_left = length
        self._held = data[offset:]
        if offset > start:
            pieces.append((new_client, data[start:offset]))
        return pieces
