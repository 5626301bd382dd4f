import Foundation

/// Byte sizes as flashmesh writes and reads them (node/cache.py `format_bytes`, `parse_bytes`).
public enum ByteSize {
    /// 1536 -> "1.50KiB", 1048576 -> "1MiB", 512 -> "512B": the same text as the Python node.
    public static func format(_ count: Int) -> String {
        var n = Double(count)
        for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
            if abs(n) < 1024 || unit == "TiB" {
                if unit == "B" { return "\(Int(n.rounded(.toNearestOrEven)))B" }
                let text = formatFixed2(n)
                return (text.hasSuffix(".00") ? String(text.dropLast(3)) : text) + unit
            }
            n /= 1024
        }
        return "\(count)B"
    }

    /// "2GB", "512MiB", "1.5g", "1048576" -> bytes (GB = 10^9, GiB = 2^30, a bare G means GiB).
    public static func parse(_ text: String) throws(UserError) -> Int {
        let units: [String: Double] = [
            "": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1_048_576, "mb": 1e6, "mib": 1_048_576,
            "g": 1_073_741_824, "gb": 1e9, "gib": 1_073_741_824, "t": 1_099_511_627_776, "tb": 1e12,
            "tib": 1_099_511_627_776,
        ]
        let s = text.lowercased().filter { $0 != " " }
        let number = String(s.reversed().drop(while: { "kmgtib".contains($0) }).reversed())
        let unit = String(s.dropFirst(number.count))
        guard let value = Double(number), value >= 0, value.isFinite, let scale = units[unit] else {
            throw UserError("cannot read '\(text)' as a size; write it like 2GB, 512MiB or 1073741824")
        }
        return Int(value * scale)
    }

    private static func formatFixed2(_ value: Double) -> String {
        String(format: "%.2f", value)  // printf's rounding, as Python's f"{n:.2f}"
    }
}
