"""The extensions' data messages encoded and decoded by hand (extensions/wire.py)
are byte for byte what protobuf makes of the same message."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pykata.api import extensions_pb2 as ext
from pykata.extensions.client import DATA_FIELDS
from pykata.extensions.wire import data_field, data_head, data_tag

#: Every message the agent or a client sends as data alone, and that field.
SENT = [
    (ext.ExecOutput, "stdout"),
    (ext.ExecOutput, "stderr"),
    (ext.ForwardMessage, "data"),
    (ext.DownloadOutput, "data"),
    (ext.UploadInput, "data"),
    (ext.ExecInput, "stdin"),
]


@given(st.binary(min_size=1, max_size=70_000), st.sampled_from(SENT))
def test_by_hand_is_what_protobuf_writes(data: bytes, sent: tuple[type, str]) -> None:
    message, field = sent
    tag = data_tag(message, field)
    encoded = data_head(tag, len(data)) + data
    assert encoded == message(**{field: data}).SerializeToString()
    assert message.FromString(encoded) == message(**{field: data})
    view = data_field(encoded, tag)
    assert view is not None and bytes(view) == data


@given(st.binary(max_size=300))
def test_only_a_message_of_data_alone_is_taken_by_hand(data: bytes) -> None:
    stdout = data_tag(ext.ExecOutput, "stdout")
    with_more = ext.ExecOutput(stdout=data or b"x", exited=True, exit_status=3)
    assert data_field(with_more.SerializeToString(), stdout) is None
    other = ext.ExecOutput(stderr=data or b"x").SerializeToString()
    assert data_field(other, stdout) is None
    # Truncated or garbage: never taken for data (protobuf decides what it is).
    whole = data_head(stdout, len(data or b"x")) + (data or b"x")
    assert data_field(whole[:-1], stdout) is None
    assert data_field(stdout + b"\xff" * 11, stdout) is None


def test_every_data_field_the_client_decodes_is_bytes() -> None:
    for message, fields in DATA_FIELDS.items():
        for field in fields:
            assert message.DESCRIPTOR.fields_by_name[field].type == 12  # TYPE_BYTES
