"""Framing without sockets: split input, oversize skipping, round trips."""

from __future__ import annotations

from dataclasses import astuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykata.ttrpc.frame import (
    HEADER,
    IN_PLACE_SIZE,
    MAX_DATA_SIZE,
    READ_SIZE,
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


@given(
    frames,
    st.lists(st.tuples(st.integers(1, 64), st.integers(0, 3)), min_size=1),
)
def test_frames_taken_one_at_a_time_at_any_pace_are_the_same_and_counted(
    items: list[tuple[int, int, int, bytes]], steps: list[tuple[int, int]]
) -> None:
    """A server may stop taking frames (backpressure) while bytes keep coming:
    the frames come out the same, and `buffered` is always exactly the bytes
    received and not yet handed out - what the server's memory bounds count."""
    wire = b"".join(encode_frame(*item) for item in items)
    sizes = [HEADER.size + len(item[3]) for item in items]
    decoder = FrameDecoder()
    got: list[Frame | OversizeFrame] = []
    offset = i = 0
    while offset < len(wire) or len(got) < len(items):
        step, takes = steps[i % len(steps)]
        i += 1
        decoder.push(wire[offset : offset + step])
        offset = min(offset + step, len(wire))
        drained = False
        for _ in range(takes if offset < len(wire) else len(items) + 1):
            frame = decoder.next_frame()
            if frame is None:
                drained = True
                break
            got.append(frame)
        assert decoder.buffered == offset - sum(sizes[: len(got)])
        if drained:  # what is held now is the start of a frame, if anything
            assert decoder.in_frame() == (decoder.buffered > 0)
    assert got == [Frame(*item) for item in items]
    assert decoder.frames == len(items)
    assert decoder.buffered == 0 and not decoder.in_frame() and decoder.at_frame_boundary()


big_data = st.builds(
    lambda head, size, fill: head + bytes([fill]) * size,
    st.binary(max_size=20),
    st.integers(IN_PLACE_SIZE - 20, IN_PLACE_SIZE + 300),
    st.integers(0, 255),
)
mixed_frames = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.integers(0, 255),
        st.one_of(st.binary(max_size=300), big_data),
    ),
    max_size=8,
)


@given(mixed_frames, st.lists(st.tuples(st.integers(1, 100_000), st.booleans()), min_size=1))
def test_reads_in_place_at_any_size_mixed_with_pushes_decode_the_same_frames(
    items: list[tuple[int, int, int, bytes]], reads: list[tuple[int, bool]]
) -> None:
    """A client reads where get_buffer() says (a big frame's data straight into
    its own buffer); bytes pushed meanwhile, reads cut anywhere, small and big
    frames mixed: the same frames come out, and `buffered` counts exactly."""
    wire = b"".join(encode_frame(*item) for item in items)
    sizes = [HEADER.size + len(item[3]) for item in items]
    decoder = FrameDecoder()
    got: list[Frame | OversizeFrame] = []
    offset = i = 0
    while offset < len(wire):
        size, pushed = reads[i % len(reads)]
        i += 1
        piece = wire[offset : offset + size]
        if pushed:
            decoder.push(piece)
        else:
            buffer = decoder.get_buffer()
            piece = piece[: len(buffer)]
            buffer[: len(piece)] = piece
            decoder.buffer_updated(len(piece))
        offset += len(piece)
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
        assert decoder.buffered == offset - sum(sizes[: len(got)])
    assert got == [Frame(*item) for item in items]
    assert decoder.frames == len(items) and decoder.at_frame_boundary()


def test_a_big_frame_is_read_into_the_buffer_it_is_handed_out_in() -> None:
    data = bytes(range(256)) * (IN_PLACE_SIZE // 256 + 1)
    wire = encode_frame(3, MessageType.DATA, 0, data)
    decoder = FrameDecoder()
    first = decoder.get_buffer()
    first[:1000] = wire[:1000]
    decoder.buffer_updated(1000)
    assert decoder.next_frame() is None and decoder.in_frame()
    rest = decoder.get_buffer()
    # exactly the rest of the frame's data: the next read cannot run past it
    assert len(rest) == len(wire) - 1000
    rest[:] = wire[1000:]
    decoder.buffer_updated(len(rest))
    frame = decoder.next_frame()
    assert frame == Frame(3, MessageType.DATA, 0, data)
    assert frame is not None and rest.obj is frame.data  # read in place, not copied after


def test_in_frame_tells_a_started_frame_from_a_boundary() -> None:
    decoder = FrameDecoder()
    data = encode_frame(1, MessageType.REQUEST, 0, b"x" * 100)
    decoder.push(data[:4])
    assert decoder.next_frame() is None and decoder.in_frame()
    decoder.push(data[4:50])
    assert decoder.next_frame() is None and decoder.in_frame()
    assert decoder.buffered == 50
    decoder.push(data[50:])
    assert decoder.next_frame() == Frame(1, 1, 0, b"x" * 100)
    assert not decoder.in_frame() and decoder.frames == 1
    decoder.push(HEADER.pack(MAX_DATA_SIZE + 5, 3, 1, 0))  # oversize: skipped, never held
    assert isinstance(decoder.next_frame(), OversizeFrame)
    assert decoder.in_frame() and decoder.buffered == 0


@pytest.mark.parametrize("cut", [1, 5, 10, 11, 4096, IN_PLACE_SIZE + 9, READ_SIZE, 5 << 20])
def test_hostile_lengths_read_in_place_come_out_whole_and_in_sync(cut: int) -> None:
    """Lengths just under and over the in-place size, exactly the limit, and one
    over the limit (skipped) between them, read where get_buffer() says, every
    other read at most `cut` bytes (headers split anywhere): each frame comes out
    whole and the stream stays in sync."""
    sizes = [IN_PLACE_SIZE - 1, IN_PLACE_SIZE, MAX_DATA_SIZE, IN_PLACE_SIZE + 1, 3]
    frames = [Frame(i, MessageType.DATA, 0, bytes([i]) * size) for i, size in enumerate(sizes)]
    oversize = HEADER.pack(MAX_DATA_SIZE + 1, 9, MessageType.RESPONSE, 0)
    wire = b"".join(
        [encode_frame(*astuple(frames[0])), oversize, b"\1" * (MAX_DATA_SIZE + 1)]
        + [encode_frame(*astuple(frame)) for frame in frames[1:]]
    )
    decoder = FrameDecoder()
    got: list[Frame | OversizeFrame] = []
    offset = reads = 0
    while offset < len(wire):
        buffer = decoder.get_buffer()
        reads += 1
        size = min(cut if reads % 2 else 777_777, len(buffer), len(wire) - offset)
        buffer[:size] = wire[offset : offset + size]
        decoder.buffer_updated(size)
        offset += size
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    oversized = OversizeFrame(9, MessageType.RESPONSE, 0, MAX_DATA_SIZE + 1)
    assert got == [frames[0], oversized, *frames[1:]]
    assert decoder.at_frame_boundary() and decoder.buffered == 0
