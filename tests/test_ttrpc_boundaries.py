"""Telling ttRPC clients apart on a stream they share in turn (a virtio-serial port).

The port itself exists only in a guest: tests/test_vm.py serves clients in a
row on it for real.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pykata.ttrpc.boundaries import ClientBoundaries
from pykata.ttrpc.frame import MessageType, encode_frame


def request(stream_id: int, payload: bytes = b"x") -> bytes:
    return encode_frame(stream_id, MessageType.REQUEST, 0, payload)


def client(count: int, payload: bytes) -> bytes:
    """A client's requests: streams 1, 3, 5, ... as ttRPC clients number them."""
    return b"".join(request(2 * n + 1, payload) for n in range(count))


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.binary(max_size=40),
    st.integers(1, 23),
)
def test_each_new_client_is_found_however_the_bytes_arrive(
    clients: list[int], payload: bytes, step: int
) -> None:
    # The stream ids restart at 1 with each client; a cut falls exactly there.
    sessions = [client(count, payload) for count in clients]
    wire = b"".join(sessions)
    boundaries = ClientBoundaries()
    got: list[bytearray] = []
    for offset in range(0, len(wire), step):
        for new_client, chunk in boundaries.feed(wire[offset : offset + step]):
            if new_client or not got:
                got.append(bytearray())
            got[-1] += chunk
    assert [bytes(s) for s in got] == sessions


def test_responses_and_a_payload_that_looks_like_a_header_do_not_cut() -> None:
    tricky = request(1)[:10]  # a request header for stream 1, as payload
    wire = request(1, tricky) + encode_frame(1, MessageType.RESPONSE, 0, b"") + request(3)
    assert ClientBoundaries().feed(wire) == [(False, wire)]
