"""Our protos against the reference descriptor set, field by field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from hypothesis import given
from hypothesis import strategies as st

from pykata.api import agent_pb2, csi_pb2, health_pb2, oci_pb2, types_pb2

from .peers import REFERENCE_DESCRIPTORS

OURS: dict[str, FileDescriptor] = {
    m.DESCRIPTOR.name: m.DESCRIPTOR for m in (oci_pb2, csi_pb2, types_pb2, agent_pb2, health_pb2)
}


def reference_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(REFERENCE_DESCRIPTORS.read_bytes())
    return {f.name: f for f in fds.file if not f.name.startswith("google/")}


def as_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def walk_messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from walk_messages(list(message.nested_type), name)


def walk_enums(file: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    enums = {
        f"{file.package}.{e.name}": {v.name: v.number for v in e.value} for e in file.enum_type
    }
    for name, message in walk_messages(list(file.message_type), file.package):
        for e in message.enum_type:
            enums[f"{name}.{e.name}"] = {v.name: v.number for v in e.value}
    return enums


def field_facts(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple[object, ...]]:
    facts = {}
    for f in message.field:
        oneof = message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else ""
        facts[f.name] = (f.number, f.type, f.label, f.type_name, f.proto3_optional, oneof)
    return facts


def mismatches(
    ref: descriptor_pb2.FileDescriptorProto, ours: descriptor_pb2.FileDescriptorProto
) -> list[str]:
    problems = []
    if ref.package != ours.package:
        problems.append(f"{ref.name}: package {ours.package!r}, reference {ref.package!r}")
    ref_msgs = dict(walk_messages(list(ref.message_type), ref.package))
    our_msgs = dict(walk_messages(list(ours.message_type), ours.package))
    for name in sorted(ref_msgs.keys() - our_msgs.keys()):
        problems.append(f"message {name} is missing")
    for name in sorted(our_msgs.keys() - ref_msgs.keys()):
        problems.append(f"message {name} is not in the reference")
    for name in sorted(ref_msgs.keys() & our_msgs.keys()):
        ref_fields, our_fields = field_facts(ref_msgs[name]), field_facts(our_msgs[name])
        if ref_msgs[name].options.map_entry != our_msgs[name].options.map_entry:
            problems.append(f"{name}: map entry flag differs")
        for fname in sorted(ref_fields.keys() | our_fields.keys()):
            r, o = ref_fields.get(fname), our_fields.get(fname)
            if r != o:
                problems.append(
                    f"{name}.{fname}: ours (number, type, label, type_name, optional, oneof)="
                    f"{o}, reference={r}"
                )
    ref_enums, our_enums = walk_enums(ref), walk_enums(ours)
    for name in sorted(ref_enums.keys() | our_enums.keys()):
        if ref_enums.get(name) != our_enums.get(name):
            problems.append(
                f"enum {name}: ours {our_enums.get(name)}, reference {ref_enums.get(name)}"
            )
    ref_svcs = {s.name: s for s in ref.service}
    our_svcs = {s.name: s for s in ours.service}
    for sname in sorted(ref_svcs.keys() | our_svcs.keys()):
        if sname not in our_svcs or sname not in ref_svcs:
            problems.append(f"service {ours.package}.{sname} present on one side only")
            continue
        ref_methods = {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in ref_svcs[sname].method
        }
        our_methods = {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in our_svcs[sname].method
        }
        for mname in sorted(ref_methods.keys() | our_methods.keys()):
            if ref_methods.get(mname) != our_methods.get(mname):
                ours_m, ref_m = our_methods.get(mname), ref_methods.get(mname)
                problems.append(f"{sname}/{mname}: ours {ours_m}, reference {ref_m}")
    return problems


def test_every_reference_file_has_ours() -> None:
    assert sorted(reference_files()) == sorted(OURS)


@pytest.mark.parametrize("name", sorted(OURS))
def test_file_matches_reference(name: str) -> None:
    problems = mismatches(reference_files()[name], as_proto(OURS[name]))
    assert not problems, "\n".join(problems)


def test_comparison_detects_a_changed_field() -> None:
    """The checker itself must notice a renumbered field, a retyped one and a lost method."""
    ours = as_proto(OURS["agent.proto"])
    message = next(m for m in ours.message_type if m.name == "CreateContainerRequest")
    message.field[0].number = 99
    message.field[1].type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    del ours.service[0].method[0]
    problems = mismatches(reference_files()["agent.proto"], ours)
    assert any("CreateContainerRequest.container_id" in p for p in problems)
    assert any("CreateContainerRequest.exec_id" in p for p in problems)
    assert any("AgentService/CreateContainer" in p for p in problems)


def test_services_are_complete() -> None:
    agent = OURS["agent.proto"].services_by_name["AgentService"]
    health = OURS["health.proto"].services_by_name["Health"]
    assert len(agent.methods) == 42
    assert [m.name for m in health.methods] == ["Check", "Version"]


@given(st.one_of(st.binary(max_size=300), st.integers(0, 300_000).map(lambda n: b"o" * n)))
def test_output_answers_are_the_bytes_protobuf_writes(data: bytes) -> None:
    """ReadStdout/ReadStderr answers are encoded by hand (no copy of the output):
    the same bytes as the message, which decode back to the output."""
    from pykata.agent.service import read_stream_response

    encoded = read_stream_response(data).SerializeToString()
    assert encoded == agent_pb2.ReadStreamResponse(data=data).SerializeToString()
    assert agent_pb2.ReadStreamResponse.FromString(encoded).data == data
