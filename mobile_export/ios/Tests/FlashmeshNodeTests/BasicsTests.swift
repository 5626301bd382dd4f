import XCTest

@testable import FlashmeshNode

final class ChecksumTests: XCTestCase {
    /// xxh3-64 of every length class (0, 1-3, 4-8, 9-16, 17-128, 129-240, long: stripes and blocks).
    func testXXH3EqualsPythonAtEveryLengthClass() throws {
        let v = try loadVectors()
        let data = try Vectors.bytes("xxh3.bin")
        XCTAssertGreaterThan(v.xxh3.count, 30)
        for entry in v.xxh3 {
            XCTAssertEqual(Checksum.xxh3Hex(Array(data.prefix(entry.length))), entry.hex, "length \(entry.length)")
        }
    }
}

final class ByteSizeTests: XCTestCase {
    func testFormatAndParseAsPython() throws {
        let v = try loadVectors()
        for pair in v.sizes.format {
            guard case let .count(n) = pair[0], case let .text(text) = pair[1] else { return XCTFail("bad vector") }
            XCTAssertEqual(ByteSize.format(n), text)
        }
        for pair in v.sizes.parse {
            guard case let .text(text) = pair[0], case let .count(n) = pair[1] else { return XCTFail("bad vector") }
            XCTAssertEqual(try ByteSize.parse(text), n, text)
        }
        XCTAssertThrowsError(try ByteSize.parse("lots"))
    }
}

final class JSONTextTests: XCTestCase {
    func testPythonSortedDumpKeepsLiteralsAndEscapes() throws {
        let text = try JSONText.parse(Array(#"{"b": [1e-06, 10000.0, -0.5], "a": "\u00e9\n\"", "c": {"z": null, "y": true}}"#.utf8))
        XCTAssertEqual(
            text.pythonSortedDump(), #"{"a": "\u00e9\n\"", "b": [1e-06, 10000.0, -0.5], "c": {"y": true, "z": null}}"#)
        XCTAssertThrowsError(try JSONText.parse(Array("{\"a\": }".utf8)))
        XCTAssertThrowsError(try JSONText.parse(Array("[1, 2".utf8)))
    }
}
