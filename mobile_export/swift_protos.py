"""Generate the Swift node's message types (mobile_export/ios/.../Proto/Messages.swift) from flashmesh.proto.

    python -m flashmesh.mobile_export.swift_protos          # rewrites the committed file
    python -m flashmesh.mobile_export.swift_protos OUT      # writes OUT (the drift test compares)

No protobuf generator for Swift can be installed on these machines (swift-protobuf is an outside
package), so this reads the proto's descriptor from the generated Python module and writes plain
Swift structs over the package's wire runtime (Proto/Wire.swift). A proto change that uses a field
type the runtime lacks stops here with one line, rather than producing a codec that drops it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flashmesh.protos import flashmesh_pb2 as pb
from google.protobuf.descriptor import FieldDescriptor as F

OUT = Path(__file__).resolve().parent / "ios" / "Sources" / "FlashmeshNode" / "Proto" / "Messages.swift"

# proto type -> (Swift type, writer label, how a decoded varint / value becomes the Swift type)
SCALARS = {
    F.TYPE_INT32: ("Int32", "int32", "Int32(truncatingIfNeeded: {v})", "0"),
    F.TYPE_INT64: ("Int64", "int64", "Int64(bitPattern: {v})", "0"),
    F.TYPE_UINT32: ("UInt32", "uint32", "UInt32(truncatingIfNeeded: {v})", "0"),
    F.TYPE_BOOL: ("Bool", "bool", "{v} != 0", "false"),
}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _repeated(f) -> bool:
    return f.is_repeated


def _field(f) -> tuple[str, str, str, list[str]]:
    """(declaration, encode line, Codable key, decode cases) of one field."""
    name, n = camel(f.name), f.number
    if name in ("reader", "writer", "field", "number", "wire"):  # the codec's own names in encode / merge
        raise SystemExit(f"swift_protos: field {f.full_name} would shadow the codec's `{name}`; rename it")
    if f.type == F.TYPE_MESSAGE:
        msg = f.message_type.name
        if _repeated(f):
            case = f"case ({n}, .lengthDelimited): {name}.append(try reader.message(merging: nil as {msg}?))"
            return f"public var {name}: [{msg}] = []", f"writer.write({n}, messages: {name})", name, [case]
        case = f"case ({n}, .lengthDelimited): {name} = try reader.message(merging: {name})"
        return f"public var {name}: {msg}?", f"writer.write({n}, message: {name})", name, [case]
    if f.type in (F.TYPE_STRING, F.TYPE_BYTES) and not _repeated(f):
        swift, label, read = (
            ("String", "string", "try reader.string()")
            if f.type == F.TYPE_STRING
            else ("[UInt8]", "bytes", "Array(try reader.lengthDelimited())")
        )
        default = '""' if f.type == F.TYPE_STRING else "[]"
        case = f"case ({n}, .lengthDelimited): {name} = {read}"
        return f"public var {name}: {swift} = {default}", f"writer.write({n}, {label}: {name})", name, [case]
    if f.type == F.TYPE_DOUBLE and not _repeated(f):
        case = f"case ({n}, .fixed64): {name} = Double(bitPattern: try reader.fixed64())"
        return f"public var {name}: Double = 0", f"writer.write({n}, double: {name})", name, [case]
    if f.type in SCALARS:
        swift, label, convert, default = SCALARS[f.type]
        if _repeated(f):
            if f.type not in (F.TYPE_INT32, F.TYPE_INT64):
                raise SystemExit(f"swift_protos: repeated {f.full_name} of this type has no Swift writer; add one")
            value = convert.format(v="$0")
            case = f"case ({n}, .varint), ({n}, .lengthDelimited): {name} += try reader.varints(wire).map {{ {value} }}"
            decl = f"public var {name}: [{swift}] = []"
            return decl, f"writer.write({n}, packed{swift}: {name})", name, [case]
        case = f"case ({n}, .varint): {name} = {convert.format(v='try reader.varint()')}"
        return f"public var {name}: {swift} = {default}", f"writer.write({n}, {label}: {name})", name, [case]
    raise SystemExit(f"swift_protos: field {f.full_name} has a type the Swift wire runtime lacks; add it to Wire.swift")


def _message(m) -> str:
    fields = sorted(m.fields, key=lambda f: f.number)  # protobuf writes fields in number order
    parts = [_field(f) for f in fields]
    lines = [f"/// flashmesh.v1.{m.name}", f"public struct {m.name}: ProtoMessage, Codable {{"]
    lines += [f"    {decl}" for decl, _, _, _ in parts]
    lines += ["", "    public init() {}"]
    if fields:
        lines += ["", "    enum CodingKeys: String, CodingKey {"]
        keys = [(key, f.name) for (_, _, key, _), f in zip(parts, fields, strict=True)]
        lines += [f"        case {key}" if key == name else f'        case {key} = "{name}"' for key, name in keys]
        lines += ["    }"]
    lines += ["", "    public func encode(into writer: inout ProtoWriter) {"]
    lines += [f"        {enc}" for _, enc, _, _ in parts]
    lines += ["    }", "", "    public mutating func merge(from reader: inout ProtoReader) throws(ProtoError) {"]
    lines += ["        while let field = try reader.nextField() {", "            let (number, wire) = field"]
    lines += ["            switch (number, wire) {"]
    lines += [f"            {case}" for _, _, _, cases in parts for case in cases]
    lines += ["            default: try reader.skip(wire, number: number)", "            }", "        }", "    }", "}"]
    return "\n".join(lines)


def swift_source() -> str:
    header = (
        "// Generated by `python -m flashmesh.mobile_export.swift_protos` from protos/flashmesh.proto; do not edit.\n"
        "// The messages of the node protocol over Wire.swift; Codable (proto field names) for the test vectors.\n"
    )
    messages = [_message(m) for m in pb.DESCRIPTOR.message_types_by_name.values()]
    return header + "\n" + "\n\n".join(messages) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.write_text(swift_source())
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
