"""`swift test` of the Swift node's package (mobile_export/ios) on vectors the Python side writes from this
session's test bundles (flashmesh.testing.swift_vectors), and the drift test of its generated messages."""

from __future__ import annotations

import os
import re

import pytest
from flashmesh.mobile_export.swift_protos import OUT, _field, swift_source
from flashmesh.testing.swift_node import swift_run
from flashmesh.testing.swift_vectors import BUNDLES, write_vectors
from google.protobuf import descriptor_pb2, descriptor_pool


def test_generated_swift_messages_match_the_proto():
    assert OUT.read_text() == swift_source(), "run `python -m flashmesh.mobile_export.swift_protos`"


def test_a_field_that_would_shadow_the_codec_is_refused():
    """`reader` as a field name compiled to `reader = try reader.string()` inside merge(from reader:)."""
    proto = descriptor_pb2.FileDescriptorProto(name="shadow.proto", package="shadow")
    message = proto.message_type.add(name="M")
    message.field.add(name="reader", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    with pytest.raises(SystemExit, match="shadow.M.reader would shadow the codec's `reader`; rename it"):
        _field(pool.FindMessageTypeByName("shadow.M").fields_by_name["reader"])


def test_swift_unit_tests_on_python_vectors(swift_binary, swift_bundles, tmp_path):
    assert set(swift_bundles) == set(BUNDLES)
    vectors = write_vectors(tmp_path / "vectors", bundles={name: b for name, (_, b) in swift_bundles.items()})
    output = swift_run("test", "--skip-build", env={**os.environ, "FLASHMESH_SWIFT_VECTORS": str(vectors)})
    ran = re.search(r"Test Suite 'All tests' passed.*\n\s*Executed (\d+) tests?, with 0 failures", output)
    assert ran and int(ran.group(1)) >= 13, output
    print(next(line for line in output.splitlines() if "per-pair outputs" in line))
