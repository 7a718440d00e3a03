"""The extensions' data messages encoded by hand, on both ends.

A message whose only field is its data (ExecOutput.stdout, ForwardMessage.data,
DownloadOutput.data, UploadInput.data ...) is, as protobuf writes it, the
field's tag, the data's length as a varint, then the data. Writing those few
bytes ourselves and the data after them as it is saves protobuf's copies of a
megabyte into a message and out again; the peer decodes the same bytes with
protobuf, or with `data_field` below.
"""

from __future__ import annotations

from google.protobuf.message import Message

from ..ttrpc.frame import varint

#: Protobuf's wire type of a length-delimited field (bytes, strings, messages).
LENGTH_DELIMITED = 2


def data_tag(message: type[Message], field: str) -> bytes:
    """The tag of the bytes field `field` of `message`."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    return varint(number << 3 | LENGTH_DELIMITED)


def data_head(tag: bytes, size: int) -> bytes:
    """What goes before `size` bytes of data in a message holding only them."""
    return tag + varint(size)


def data_field(payload: bytes, tag: bytes) -> memoryview | None:
    """The data of a message holding only the field `tag` (a view into `payload`,
    not a copy); None for any other message."""
    if not payload.startswith(tag):
        return None
    pos, length, shift = len(tag), 0, 0
    while pos < len(payload) and shift < 64:
        byte = payload[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return memoryview(payload)[pos:] if pos + length == len(payload) else None
    return None
