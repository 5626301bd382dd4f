import Foundation
import XCTest

@testable import FlashmeshNode

/// Every message of the protocol: Swift encodes the Python vector's field values to Python protobuf's
/// bytes exactly, decodes those bytes back to the same values, decodes what Python accepts though it
/// never writes it, and refuses what Python refuses.
final class MessageTests: XCTestCase {
    typealias Codec = (
        encode: @Sendable (Data) throws -> [UInt8], decode: @Sendable ([UInt8]) throws -> Data,
        parses: @Sendable ([UInt8]) -> Bool
    )

    static func codec<M: ProtoMessage & Codable>(_ type: M.Type) -> Codec {
        (
            encode: { try JSONDecoder().decode(M.self, from: $0).serialized() },
            decode: { try JSONEncoder().encode(try M(serialized: $0)) },
            parses: { (try? M(serialized: $0)) != nil }
        )
    }

    static let codecs: [String: Codec] = [
        "Tensor": codec(Tensor.self), "InfoRequest": codec(InfoRequest.self), "LayerHoldings": codec(LayerHoldings.self),
        "NodeInfo": codec(NodeInfo.self), "ComputeRequest": codec(ComputeRequest.self),
        "ComputeReply": codec(ComputeReply.self), "PrefetchRequest": codec(PrefetchRequest.self),
        "PrefetchReply": codec(PrefetchReply.self), "StatsRequest": codec(StatsRequest.self),
        "NodeStats": codec(NodeStats.self), "HealthRequest": codec(HealthRequest.self),
        "HealthReply": codec(HealthReply.self),
    ]

    /// The vector's "fields" object, re-serialized for JSONDecoder.
    func fields(_ raw: [String: Any]) throws -> Data {
        try JSONSerialization.data(withJSONObject: raw["fields"] ?? [:], options: [.fragmentsAllowed])
    }

    func raw() throws -> [String: [[String: Any]]] {
        let data = try Vectors.bytes("index.json")
        let index = try JSONSerialization.jsonObject(with: Data(data)) as? [String: Any]
        return try XCTUnwrap(index?["messages"] as? [String: [[String: Any]]])
    }

    func testEveryMessageEncodesToPythonsBytes() throws {
        let messages = try raw()
        let encoded = try XCTUnwrap(messages["encoded"])
        XCTAssertEqual(Set(encoded.compactMap { $0["message"] as? String }), Set(MessageTests.codecs.keys))
        for vector in encoded {
            let name = try XCTUnwrap(vector["message"] as? String)
            let hex = try XCTUnwrap(vector["hex"] as? String)
            let codec = try XCTUnwrap(MessageTests.codecs[name], "no Swift type for \(name): regenerate Messages.swift")
            XCTAssertEqual(hexString(try codec.encode(try fields(vector))), hex, name)
            try assertSameFields(codec.decode(bytes(hex)), try fields(vector), name)
        }
    }

    func testNonCanonicalEncodingsDecodeAsPythonDecodesThem() throws {
        for vector in try XCTUnwrap(try raw()["decoded"]) {
            let name = try XCTUnwrap(vector["message"] as? String)
            let hex = try XCTUnwrap(vector["hex"] as? String)
            try assertSameFields(MessageTests.codecs[name]!.decode(bytes(hex)), try fields(vector), "\(name) \(hex)")
        }
    }

    func testWhatPythonRefusesIsRefused() throws {
        for vector in try XCTUnwrap(try raw()["refused"]) {
            let name = try XCTUnwrap(vector["message"] as? String)
            let hex = try XCTUnwrap(vector["hex"] as? String)
            XCTAssertFalse(MessageTests.codecs[name]!.parses(bytes(hex)), "\(name) \(hex) was accepted")
        }
    }

    /// Compares decoded values as JSON objects (numbers by value; an absent sub-message is null in the
    /// vectors and left out by JSONEncoder).
    func assertSameFields(_ got: Data, _ want: Data, _ what: String) throws {
        let a = try JSONSerialization.jsonObject(with: got, options: [.fragmentsAllowed])
        let b = try JSONSerialization.jsonObject(with: want, options: [.fragmentsAllowed])
        XCTAssertEqual(withoutNulls(a) as? NSDictionary, withoutNulls(b) as? NSDictionary, what)
    }

    func withoutNulls(_ value: Any) -> Any {
        if let object = value as? [String: Any] {
            return object.filter { !($0.value is NSNull) }.mapValues(withoutNulls)
        }
        if let array = value as? [Any] { return array.map(withoutNulls) }
        return value
    }

    func bytes(_ hex: String) -> [UInt8] {
        var out: [UInt8] = []
        var it = hex.makeIterator()
        while let a = it.next(), let b = it.next() { out.append(UInt8(String([a, b]), radix: 16) ?? 0) }
        return out
    }

    func hexString(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
