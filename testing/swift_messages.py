"""Message vectors for the Swift node's codec: every message of flashmesh.proto with every field set
(two sets of values, edge cases included), empty, and with empty sub-messages present, as Python
protobuf encodes them; encodings Python accepts though it never writes them (unpacked repeated
fields, unknown fields, fields out of order or repeated); and bytes it refuses. Driven by the
descriptor, so a field added to the proto gets vectors without touching this file."""

from __future__ import annotations

from flashmesh.protos import flashmesh_pb2 as pb
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import DecodeError

VALUES = {  # proto type -> (first set, second set) of values for a field; repeated fields take the whole list
    F.TYPE_INT32: ([-1, 2**31 - 1, 7], [-(2**31), 0, 300]),
    F.TYPE_INT64: ([-1, 2**63 - 1, 9], [-(2**63), 2**40, 0]),
    F.TYPE_UINT32: ([2**32 - 1], [1]),
    F.TYPE_DOUBLE: ([-0.0], [1e-300, -2.5e10]),
    F.TYPE_BOOL: ([True], [True]),
    F.TYPE_STRING: (["node-\u00e9\u4e16"], ["x" * 200]),
    F.TYPE_BYTES: ([bytes(range(256))], [b"\x00"]),
}


def fields_json(message) -> dict:
    """Every field by its proto name (what the Swift structs' Codable conformance reads)."""
    out = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.type == F.TYPE_MESSAGE:
            if f.is_repeated:
                out[f.name] = [fields_json(v) for v in value]
            else:
                out[f.name] = fields_json(value) if message.HasField(f.name) else None
        elif f.type == F.TYPE_BYTES:
            out[f.name] = list(value)
        elif f.is_repeated:
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def _filled(descriptor, variant: int, depth: int = 0):
    message = getattr(pb, descriptor.name)()
    for f in descriptor.fields:
        if f.type == F.TYPE_MESSAGE:
            if depth > 2:
                continue
            if f.is_repeated:
                for i in range(2):
                    getattr(message, f.name).add().CopyFrom(_filled(f.message_type, (variant + i) % 2, depth + 1))
            else:
                getattr(message, f.name).CopyFrom(_filled(f.message_type, variant, depth + 1))
                getattr(message, f.name).SetInParent()
            continue
        values = VALUES[f.type][variant]
        if f.is_repeated:
            getattr(message, f.name).extend(values)
        else:
            setattr(message, f.name, values[-1])
    return message


def _empty_parts(descriptor):
    """Every singular sub-message present but empty (written as tag + zero length)."""
    message = getattr(pb, descriptor.name)()
    for f in descriptor.fields:
        if f.type == F.TYPE_MESSAGE and not f.is_repeated:
            getattr(message, f.name).SetInParent()
    return message


def _accepted(name: str, data: bytes) -> dict:
    message = getattr(pb, name).FromString(data)
    return {"message": name, "hex": data.hex(), "fields": fields_json(message)}


def message_vectors() -> dict:
    encoded = []
    for descriptor in pb.DESCRIPTOR.message_types_by_name.values():
        for message in (getattr(pb, descriptor.name)(), _filled(descriptor, 0), _filled(descriptor, 1)):
            encoded.append(
                {"message": descriptor.name, "hex": message.SerializeToString().hex(), "fields": fields_json(message)}
            )
        if any(f.type == F.TYPE_MESSAGE for f in descriptor.fields):
            message = _empty_parts(descriptor)
            encoded.append(
                {"message": descriptor.name, "hex": message.SerializeToString().hex(), "fields": fields_json(message)}
            )
    decoded = [
        _accepted("PrefetchRequest", bytes.fromhex("0803100110021203030405")),  # unpacked + packed
        _accepted("PrefetchRequest", bytes.fromhex("100108050807")),  # out of order, last value wins
        _accepted("HealthReply", bytes.fromhex("08019a05036162632d010203041203616263")),  # unknown fields
        _accepted("ComputeRequest", bytes.fromhex("12050a0361626312041a020102")),  # sub-message merged
        _accepted("LayerHoldings", bytes.fromhex("08ffffffff0f")),  # int32 as a 5-byte varint
        _accepted("Tensor", bytes.fromhex("0b08010c0a0178")),  # a group (unknown field)
        _accepted("InfoRequest", bytes.fromhex("0800")),
        _accepted("HealthReply", bytes.fromhex("0902000000000000000a00")),  # known number, other wire type
    ]
    refused = []
    for name, data in (
        ("Tensor", "0a02ff00"),  # a string that is not UTF-8
        ("Tensor", "0a05616263"),  # cut short
        ("PrefetchRequest", "08ffffffffffffffffffff01"),  # an 11-byte varint
        ("HealthRequest", "0f"),  # wire type 7
        ("HealthRequest", "00"),  # field number 0
        ("Tensor", "0c"),  # an end of group without its start
    ):
        try:
            getattr(pb, name).FromString(bytes.fromhex(data))
        except DecodeError:
            refused.append({"message": name, "hex": data})
            continue
        raise AssertionError(f"Python protobuf accepted {name} {data}; pick another refused case")
    return {"encoded": encoded, "decoded": decoded, "refused": refused}
