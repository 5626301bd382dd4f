/// One record as read from flash -> the tensors the cache holds (node/bundle_source.py `_arrays`):
/// fp16 -> fp32; packed uint32 words as they are; int8 values re-packed into affine uint32 words.
enum RecordConversion {
    static func fill(
        _ slab: Slab, slot: Int, record: UnsafeRawPointer, layer: LayerPlan, weights: ExpertBundle.Weights
    ) {
        for (index, tensor) in slab.tensors.enumerated() {
            guard let entry = layer.recordTensors[tensor.name] else { continue }  // checked when opened
            let source = record + entry.offset
            let destination = slab.pointer(tensor: index, slot: slot)
            switch (tensor.type, entry.dtype) {
            case (.float32, _):
                Half.widen(source, count: entry.nbytes / 2, into: destination.assumingMemoryBound(to: Float.self))
            case (.uint32, "int8"):
                if case let .affine(bits, _, offset?) = weights {
                    packAffine(source.assumingMemoryBound(to: Int8.self), count: entry.nbytes, bits: bits, offset: offset,
                               into: destination.assumingMemoryBound(to: UInt32.self))
                }
            default:
                destination.copyMemory(from: source, byteCount: entry.nbytes)
            }
        }
    }

    /// int8 values (q - offset) -> MLX's affine packing: 32/bits values per word, the first in the lowest bits.
    static func packAffine(
        _ values: UnsafePointer<Int8>, count: Int, bits: Int, offset: Int, into words: UnsafeMutablePointer<UInt32>
    ) {
        let perWord = 32 / bits
        let mask = UInt32((1 << bits) - 1)
        for w in 0..<count / perWord {
            var word: UInt32 = 0
            for k in 0..<perWord {
                let q = UInt32(truncatingIfNeeded: Int(values[w * perWord + k]) + offset) & mask
                word |= q << UInt32(k * bits)
            }
            words[w] = word
        }
    }
}
