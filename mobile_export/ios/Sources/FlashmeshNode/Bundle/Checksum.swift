import CXXHash

/// XXH3-64, the checksum `flashmesh pack` and `export-ios` write for every record and manifest section
/// (Python's `xxhash.xxh3_64_hexdigest`), from xxhash's header (compiled inline).
public enum Checksum {
    public static func xxh3(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        fm_xxh3_64(bytes.baseAddress, bytes.count)
    }

    /// 16 lower-case hex digits, as Python's `hexdigest()`.
    public static func xxh3Hex(_ bytes: UnsafeRawBufferPointer) -> String {
        let hex = String(xxh3(bytes), radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }

    public static func xxh3Hex(_ bytes: [UInt8]) -> String {
        bytes.withUnsafeBytes { xxh3Hex($0) }
    }
}
