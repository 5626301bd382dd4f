/// The protobuf wire format, as far as flashmesh.proto uses it (proto3: varints, doubles, strings,
/// bytes, messages, packed repeated scalars). Messages.swift, generated from the proto by
/// mobile_export/swift_protos.py, calls these; the tests check every message's bytes against
/// Python protobuf's.

/// A request or reply that is not a valid protobuf message of its type.
public struct ProtoError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String

    init(_ description: String) {
        self.description = description
    }
}

public enum WireType: UInt8, Sendable {
    case varint = 0, fixed64 = 1, lengthDelimited = 2, startGroup = 3, endGroup = 4, fixed32 = 5
}

/// A message of flashmesh.proto.
public protocol ProtoMessage: Equatable, Sendable {
    init()
    func encode(into writer: inout ProtoWriter)
    mutating func merge(from reader: inout ProtoReader) throws(ProtoError)
}

extension ProtoMessage {
    public init(serialized bytes: [UInt8]) throws(ProtoError) {
        self.init()
        var reader = ProtoReader(bytes[...])
        try merge(from: &reader)
    }

    public func serialized() -> [UInt8] {
        var writer = ProtoWriter()
        encode(into: &writer)
        return writer.bytes
    }
}

public struct ProtoWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    mutating func varint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: v) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    mutating func tag(_ field: Int, _ wire: WireType) {
        varint(UInt64(field) << 3 | UInt64(wire.rawValue))
    }

    // proto3 scalars: a field at its default value is not written.
    public mutating func write(_ field: Int, int32 value: Int32) {
        if value != 0 { tag(field, .varint); varint(UInt64(bitPattern: Int64(value))) }  // negative: 10 bytes
    }

    public mutating func write(_ field: Int, int64 value: Int64) {
        if value != 0 { tag(field, .varint); varint(UInt64(bitPattern: value)) }
    }

    public mutating func write(_ field: Int, uint32 value: UInt32) {
        if value != 0 { tag(field, .varint); varint(UInt64(value)) }
    }

    public mutating func write(_ field: Int, bool value: Bool) {
        if value { tag(field, .varint); varint(1) }
    }

    public mutating func write(_ field: Int, double value: Double) {
        guard value.bitPattern != 0 else { return }  // -0.0 is written, as upb does
        tag(field, .fixed64)
        var bits = value.bitPattern.littleEndian
        withUnsafeBytes(of: &bits) { bytes.append(contentsOf: $0) }
    }

    public mutating func write(_ field: Int, string value: String) {
        if !value.isEmpty { write(field, lengthDelimited: Array(value.utf8)) }
    }

    public mutating func write(_ field: Int, bytes value: [UInt8]) {
        if !value.isEmpty { write(field, lengthDelimited: value) }
    }

    public mutating func write<M: ProtoMessage>(_ field: Int, message value: M?) {
        guard let value else { return }
        write(field, lengthDelimited: value.serialized())
    }

    public mutating func write<M: ProtoMessage>(_ field: Int, messages values: [M]) {
        for value in values { write(field, lengthDelimited: value.serialized()) }
    }

    public mutating func write(_ field: Int, packedInt32 values: [Int32]) {
        writePacked(field, values.map { UInt64(bitPattern: Int64($0)) })
    }

    public mutating func write(_ field: Int, packedInt64 values: [Int64]) {
        writePacked(field, values.map { UInt64(bitPattern: $0) })
    }

    private mutating func writePacked(_ field: Int, _ values: [UInt64]) {
        guard !values.isEmpty else { return }
        var body = ProtoWriter()
        for v in values { body.varint(v) }
        write(field, lengthDelimited: body.bytes)
    }

    private mutating func write(_ field: Int, lengthDelimited body: [UInt8]) {
        tag(field, .lengthDelimited)
        varint(UInt64(body.count))
        bytes.append(contentsOf: body)
    }
}

public struct ProtoReader: Sendable {
    private let bytes: ArraySlice<UInt8>
    private var index: Int

    public init(_ bytes: ArraySlice<UInt8>) {
        self.bytes = bytes
        index = bytes.startIndex
    }

    /// The next field's number and wire type, or nil at the end.
    public mutating func nextField() throws(ProtoError) -> (number: Int, wire: WireType)? {
        guard index < bytes.endIndex else { return nil }
        let key = try varint()
        guard let wire = WireType(rawValue: UInt8(key & 7)) else { throw ProtoError("invalid wire type \(key & 7)") }
        let number = key >> 3
        guard number >= 1, number <= 0x1FFF_FFFF else { throw ProtoError("invalid field number \(number)") }
        return (Int(number), wire)
    }

    public mutating func varint() throws(ProtoError) -> UInt64 {
        var result: UInt64 = 0
        for shift in stride(from: 0, to: 70, by: 7) {
            guard index < bytes.endIndex else { throw ProtoError("truncated varint") }
            let byte = bytes[index]
            index += 1
            if shift < 64 { result |= UInt64(byte & 0x7F) << UInt64(shift) }
            if byte < 0x80 { return result }
        }
        throw ProtoError("varint longer than 10 bytes")
    }

    public mutating func fixed64() throws(ProtoError) -> UInt64 {
        guard bytes.endIndex - index >= 8 else { throw ProtoError("truncated fixed64") }
        var value: UInt64 = 0
        for i in 0..<8 { value |= UInt64(bytes[index + i]) << UInt64(8 * i) }
        index += 8
        return value
    }

    public mutating func lengthDelimited() throws(ProtoError) -> ArraySlice<UInt8> {
        let length = try varint()
        guard length <= UInt64(bytes.endIndex - index) else { throw ProtoError("truncated length-delimited field") }
        let body = bytes[index..<index + Int(length)]
        index += Int(length)
        return body
    }

    public mutating func string() throws(ProtoError) -> String {
        let body = try lengthDelimited()
        guard let text = String(validating: body, as: UTF8.self) else { throw ProtoError("string field is not UTF-8") }
        return text
    }

    public mutating func message<M: ProtoMessage>(merging existing: M?) throws(ProtoError) -> M {
        var message = existing ?? M()
        var reader = ProtoReader(try lengthDelimited())
        try message.merge(from: &reader)
        return message
    }

    /// A repeated varint field, packed (one length-delimited run) or not (one value).
    public mutating func varints(_ wire: WireType) throws(ProtoError) -> [UInt64] {
        guard wire == .lengthDelimited else { return [try varint()] }
        var reader = ProtoReader(try lengthDelimited())
        var values: [UInt64] = []
        while reader.index < reader.bytes.endIndex { values.append(try reader.varint()) }
        return values
    }

    /// Skips a field this message does not know (or one of a known number but another wire type, as upb does).
    public mutating func skip(_ wire: WireType, number: Int) throws(ProtoError) {
        switch wire {
        case .varint: _ = try varint()
        case .fixed64: _ = try fixed64()
        case .lengthDelimited: _ = try lengthDelimited()
        case .fixed32:
            guard bytes.endIndex - index >= 4 else { throw ProtoError("truncated fixed32") }
            index += 4
        case .startGroup:
            while true {
                guard let field = try nextField() else { throw ProtoError("unterminated group") }
                if field.wire == .endGroup {
                    guard field.number == number else { throw ProtoError("mismatched end of group") }
                    return
                }
                try skip(field.wire, number: field.number)
            }
        case .endGroup: throw ProtoError("end of group without a start")
        }
    }
}
