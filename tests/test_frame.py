"""Framing without sockets: split input, oversize skipping, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykata.ttrpc.frame import (
    HEADER,
    MAX_DATA_SIZE,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    MessageType,
    OversizeFrame,
    encode_frame,
)


def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    assert encode_frame(0x01020304, MessageType.DATA, 0x05, b"xy") == (
        b"\x00\x00\x00\x02\x01\x02\x03\x04\x03\x05xy"
    )


def test_decoder_waits_for_whole_frames() -> None:
    data = encode_frame(1, MessageType.REQUEST, 0, b"hello")
    decoder = FrameDecoder()
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(data[3:12]) == []
    assert not decoder.at_frame_boundary()
    assert decoder.feed(data[12:]) == [Frame(1, 1, 0, b"hello")]
    assert decoder.at_frame_boundary()


def test_oversize_payload_is_skipped_without_buffering_and_stream_stays_in_sync() -> None:
    decoder = FrameDecoder()
    length = MAX_DATA_SIZE + 1
    events = decoder.feed(HEADER.pack(length, 7, 1, 0) + b"x" * 1000)
    assert events == [OversizeFrame(7, 1, 0, length)]
    assert decoder.pending == length - 1000
    remaining = length - 1000
    # the rest of the oversize payload, then a normal frame in the same chunk
    events = decoder.feed(b"y" * remaining + encode_frame(9, 1, 0, b"ok"))
    assert events == [Frame(9, 1, 0, b"ok")]
    assert decoder.at_frame_boundary()


def test_sender_refuses_oversize() -> None:
    with pytest.raises(FrameTooLarge, match="exceeds maximum message size"):
        encode_frame(1, MessageType.REQUEST, 0, b"\0" * (MAX_DATA_SIZE + 1))


frames = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300)
    ),
    max_size=20,
)


@given(frames, st.lists(st.integers(1, 50), min_size=1))
def test_any_split_of_any_frames_decodes_to_the_same_frames(
    items: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(*item) for item in items)
    decoder = FrameDecoder()
    got: list[Frame | OversizeFrame] = []
    offset, i = 0, 0
    while offset < len(wire):
        step = cuts[i % len(cuts)]
        got += decoder.feed(wire[offset : offset + step])
        offset += step
        i += 1
    assert got == [Frame(*item) for item in items]
    assert decoder.at_frame_boundary()
