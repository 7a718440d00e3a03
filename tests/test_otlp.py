"""The sans-IO parts of tracing: record framing, the span encoder, traceparent,
OTLP/JSON, and upstream's span records."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pykata import otlp, otlpjson
from pykata.forwarder import upstream
from pykata.forwarder.server import decode_record
from pykata.otlp import HEADER, RecordDecoder, RecordError, Skipped, encode_record
from pykata.spans import SpanContext, parse_traceparent

from .upstream_spans import UpstreamSpan, create_container_trace

# --- framing ---------------------------------------------------------------------------

payload = st.one_of(
    st.binary(max_size=300).map(lambda b: b"{" + b),
    st.binary(max_size=300).map(lambda b: b"\n" + b),
)


def feed_in_steps(decoder: RecordDecoder, wire: bytes, step: int) -> list[bytes | Skipped]:
    got: list[bytes | Skipped] = []
    for offset in range(0, len(wire), step):
        got += decoder.feed(wire[offset : offset + step])
    return got


@given(st.lists(payload, max_size=10), st.integers(1, 30))
def test_records_survive_any_split(payloads: list[bytes], step: int) -> None:
    wire = b"".join(encode_record(p) for p in payloads)
    decoder = RecordDecoder()
    assert feed_in_steps(decoder, wire, step) == payloads
    assert decoder.end() is None


@given(
    st.lists(payload, min_size=1, max_size=6),
    st.binary(min_size=1, max_size=200).filter(lambda g: b"\0" not in g),
    st.integers(0, 5),
    st.integers(1, 40),
)
def test_garbage_between_records_costs_only_itself(
    payloads: list[bytes], garbage: bytes, where: int, step: int
) -> None:
    """Bytes that are no record (no zero byte: never a header) are skipped, counted
    once, and every record after them is found."""
    where = min(where, len(payloads) - 1)
    records = [encode_record(p) for p in payloads]
    wire = b"".join(records[:where]) + garbage + b"".join(records[where:])
    decoder = RecordDecoder()
    got = feed_in_steps(decoder, wire, step)
    end = decoder.end()
    if end is not None:
        got.append(end)
    skipped = [g for g in got if isinstance(g, Skipped)]
    assert [g for g in got if isinstance(g, bytes)] == payloads
    assert sum(s.length for s in skipped) == len(garbage)
    assert all(s.reason == "bytes that are not a record" for s in skipped)


def test_an_oversize_record_is_skipped_unread() -> None:
    decoder = RecordDecoder(max_record=1000)
    header = HEADER.pack(60 << 20) + b"{"
    out = decoder.feed(header)
    assert out == [Skipped(60 << 20, f"a record of {60 << 20} bytes exceeds 1000")]
    for _ in range(59):  # the rest of its 60 MiB arrive, none of it kept
        assert decoder.feed(b"x" * (1 << 20)) == [] and decoder.buffered == 0
    assert decoder.feed(b"x" * ((1 << 20) - 1) + encode_record(b"{after}")) == [b"{after}"]


def test_a_hostile_length_is_garbage() -> None:
    """A length of 2**60 is no record's: the bytes are skipped until a record starts."""
    decoder = RecordDecoder()
    assert decoder.feed(HEADER.pack(1 << 60) + b"\x0a" + b"y" * 4096) == []
    assert decoder.buffered <= HEADER.size
    assert decoder.feed(encode_record(b"{ok}")) == [
        Skipped(HEADER.size + 1 + 4096, "bytes that are not a record"),
        b"{ok}",
    ]


def test_drop_partial_skips_the_rest_of_the_record() -> None:
    decoder = RecordDecoder()
    assert decoder.feed(HEADER.pack(100) + b"{" + b"a" * 49) == []
    assert decoder.buffered == 58
    assert decoder.drop_partial() == Skipped(100, "the forwarder's receive buffer is full")
    assert decoder.buffered == 0
    assert decoder.feed(b"b" * 50 + encode_record(b"{next}")) == [b"{next}"]


def test_a_cut_off_record_is_reported() -> None:
    decoder = RecordDecoder()
    decoder.feed(encode_record(b"{whole}")[:-1])
    assert decoder.end() == Skipped(14, "a record cut off by the end of the connection")


# --- the span encoder ------------------------------------------------------------------

attribute_values = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.floats(allow_nan=False),
)


@given(
    st.dictionaries(st.text(max_size=20), attribute_values, max_size=6),
    st.text(max_size=30),
    st.binary(min_size=8, max_size=8),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 1, 2]),
    st.text(max_size=60),
    st.integers(0, 0x3FF),
)
def test_encoded_span_is_the_opentelemetry_proto_span(
    attributes: dict[str, otlp.AttributeValue],
    name: str,
    parent: bytes,
    start: int,
    status: int,
    message: str,
    flags: int,
) -> None:
    """What opentelemetry-proto parses from our bytes is the span we meant."""
    event = otlp.Event("exception", start, {"exception.message": message})
    encoded = otlp.encode_span(
        trace_id=b"T" * 16,
        span_id=b"S" * 8,
        parent_id=parent,
        name=name,
        kind=otlp.SERVER,
        start=start,
        end=start // 2,
        attributes=attributes,
        flags=flags,
        trace_state="k=v",
        events=[event],
        status=status,
        status_message=message,
    )
    span = Span.FromString(encoded)
    assert (span.trace_id, span.span_id, span.parent_span_id) == (b"T" * 16, b"S" * 8, parent)
    assert (span.name, span.kind, span.flags, span.trace_state) == (name, 2, flags, "k=v")
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (start, start // 2)
    got = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
    assert got == attributes
    assert [type(getattr(a.value, a.value.WhichOneof("value"))) for a in span.attributes] == [
        type(v) for v in attributes.values()
    ]
    assert span.events[0].name == "exception" and span.events[0].time_unix_nano == start
    assert span.events[0].attributes[0].value.string_value == message
    assert (span.status.code, span.status.message) == (status, message if status else "")


def test_long_values_are_cut_and_the_request_parses() -> None:
    span = otlp.encode_span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        parent_id=b"",
        name="CreateContainer",
        kind=otlp.SERVER,
        start=1,
        end=2,
        attributes={"container_id": "x" * (1 << 20), "n": 3},
        flags=1,
        status=otlp.STATUS_ERROR,
        status_message="e" * 10000,
        max_length=4096,
    )
    assert len(span) < 9000
    resource, scope = otlp.encode_resource_scope({"service.name": "kata-agent"}, "s", "1")
    request = ExportTraceServiceRequest.FromString(otlp.encode_request(resource, scope, [span]))
    (got,) = request.resource_spans[0].scope_spans[0].spans
    assert got.attributes[0].value.string_value == "x" * 4096
    assert got.status.message == "e" * 4096
    assert request.resource_spans[0].scope_spans[0].scope.version == "1"


# --- traceparent ------------------------------------------------------------------------


def test_traceparent() -> None:
    ctx = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "a=b")
    assert ctx == SpanContext(
        bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        bytes.fromhex("b7ad6b7169203331"),
        1,
        True,
        "a=b",
    )
    assert ctx.traceparent() == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    # a later version may append fields; version ff and zero ids are invalid
    assert parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-x")
    for bad in (
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "garbage",
    ):
        assert parse_traceparent(bad) is None, bad


# --- OTLP/JSON ------------------------------------------------------------------------


def a_request() -> ExportTraceServiceRequest:
    return decode_record(create_container_trace()[1].record()[HEADER.size :])


def test_otlp_json_ids_are_hex_and_enums_integers() -> None:
    line = otlpjson.dumps(a_request())
    span = json.loads(line)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert span["spanId"] == "2222222222222222" and span["parentSpanId"] == "1111111111111111"
    assert span["kind"] == 1 and span["links"][0]["spanId"] == "3333333333333333"
    assert span["startTimeUnixNano"] == "1700000000123457789"


def test_otlp_json_reads_new_and_old_files() -> None:
    request = a_request()
    old = json_format.MessageToJson(request)  # what kata-trace-forwarder wrote before
    assert otlpjson.loads(old) == request
    assert otlpjson.loads(otlpjson.dumps(request)) == request
    with pytest.raises(ValueError, match="neither 8 bytes in hex nor in base64"):
        otlpjson.loads('{"resourceSpans":[{"scopeSpans":[{"spans":[{"spanId":"xyz"}]}]}]}')


# --- upstream's records ---------------------------------------------------------------


def test_upstream_span_becomes_the_same_otlp_span() -> None:
    for span in create_container_trace():
        request = decode_record(span.record()[HEADER.size :])
        (got,) = request.resource_spans[0].scope_spans[0].spans
        assert json_format.MessageToDict(got) == json_format.MessageToDict(span.otlp())
        resource = {
            a.key: a.value.string_value for a in request.resource_spans[0].resource.attributes
        }
        assert resource == span.resource
        assert request.resource_spans[0].scope_spans[0].scope.name == ""  # serde(skip)


def test_nan_and_big_integers_survive() -> None:
    span = create_container_trace()[0]
    request = upstream.span_request(span.record()[HEADER.size :])
    attrs = {a.key: a.value for a in request.resource_spans[0].scope_spans[0].spans[0].attributes}
    assert math.isnan(attrs["unbounded"].double_value)
    assert attrs["counts"].array_value.values[2].int_value == 9_007_199_254_740_993


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("span_context"), "no field 'span_context'"),
        (lambda d: d.update(span_kind="Sideways"), "span_kind 'Sideways' is not one of"),
        (lambda d: d["span_context"].update(trace_id=1 << 128), "trace_id .* is out of range"),
        (lambda d: d["attributes"]["map"].update(x={"Decimal": "1"}), "'Decimal' value"),
        (lambda d: d.update(start_time=5), "start_time is not an object"),
    ],
)
def test_a_record_of_neither_shape_says_what_is_wrong(change: object, message: str) -> None:
    data = UpstreamSpan("s", 1, 2).serde()
    change(data)  # type: ignore[operator]
    with pytest.raises(RecordError, match=message):
        decode_record(json.dumps(data).encode())


def test_neither_json_span_nor_otlp_is_refused() -> None:
    for payload in (b"{not json", b"[1, 2]", b"\xff\xff\xff\xff", b"\x0a\x00", b"hello"):
        with pytest.raises(RecordError):
            decode_record(payload)
