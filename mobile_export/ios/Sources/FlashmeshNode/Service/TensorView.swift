/// A proto `Tensor` checked against its dtype and shape (protos/codec.py `to_numpy`): a malformed one is
/// a one-line `reason`, never a crash or a silent reshape.
struct TensorView {
    /// wire dtype -> element size (protos/codec.py DTYPES)
    static let elementSizes: [String: Int] = [
        "float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint8": 1, "int8": 1,
    ]
    static let floatTypes: Set<String> = ["float32", "float16", "bfloat16"]
    static let maxDimensions = 8

    let dtype: String
    let shape: [Int]
    let data: [UInt8]

    init(_ tensor: Tensor) throws(CodecFailure) {
        guard let size = TensorView.elementSizes[tensor.dtype] else {
            throw CodecFailure("unknown tensor dtype '\(tensor.dtype)'")
        }
        let dims = tensor.shape
        if dims.contains(where: { $0 < 0 }) {
            throw CodecFailure("negative dimension in tensor shape (\(dims.map(String.init).joined(separator: ", "))\(dims.count == 1 ? "," : ""))")
        }
        if dims.count > TensorView.maxDimensions {
            throw CodecFailure("tensor of \(dims.count) dimensions; at most \(TensorView.maxDimensions)")
        }
        var needed: Int64? = Int64(size)  // nil: more bytes than any message holds
        for d in dims {
            guard let n = needed else { break }
            let (product, overflow) = n.multipliedReportingOverflow(by: d)
            needed = overflow ? nil : product
        }
        guard let needed, needed == Int64(tensor.data.count) else {
            let text = needed.map(String.init) ?? "more than \(Int64.max)"
            throw CodecFailure("tensor of \(tensor.dtype) \(dims) needs \(text) bytes, got \(tensor.data.count)")
        }
        dtype = tensor.dtype
        shape = dims.map { Int($0) }
        data = tensor.data
    }

    var count: Int { shape.reduce(1, *) }

    /// No NaN or infinity (bf16 and fp16 by their exponent bits).
    var allFinite: Bool {
        data.withUnsafeBytes { raw in
            switch dtype {
            case "float32":
                return elements(raw, UInt32.self).allSatisfy { $0 & 0x7F80_0000 != 0x7F80_0000 }
            case "float16":
                return elements(raw, UInt16.self).allSatisfy { $0 & 0x7C00 != 0x7C00 }
            case "bfloat16":
                return elements(raw, UInt16.self).allSatisfy { $0 & 0x7F80 != 0x7F80 }
            default:
                return true
            }
        }
    }

    /// A float tensor's values as fp32 (exact for every float dtype).
    func floats() -> [Float] {
        data.withUnsafeBytes { raw in
            switch dtype {
            case "float32":
                return elements(raw, UInt32.self).map { Float(bitPattern: $0) }
            case "float16":
                return elements(raw, UInt16.self).map { Half.table[Int($0)] }
            case "bfloat16":
                return elements(raw, UInt16.self).map { Float(bitPattern: UInt32($0) << 16) }
            default:
                return []
            }
        }
    }

    /// An int32 tensor's values.
    func int32s() -> [Int] {
        data.withUnsafeBytes { raw in elements(raw, Int32.self).map { Int($0) } }
    }
}

/// The little-endian elements of a byte buffer (loads need no alignment).
private func elements<T: FixedWidthInteger>(_ raw: UnsafeRawBufferPointer, _ type: T.Type) -> [T] {
    let size = MemoryLayout<T>.size
    return (0..<raw.count / size).map { T(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * size, as: T.self)) }
}

struct CodecFailure: Error {
    let reason: String

    init(_ reason: String) {
        self.reason = reason
    }
}
