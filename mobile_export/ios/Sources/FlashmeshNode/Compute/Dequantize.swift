/// Affine dequantization on the CPU: w = scale * q + bias per group of `groupSize` values along a row,
/// in fp32 with one rounding per operation (mobile_export/bundle_format.py `dequantize_affine`).
public enum Dequantize {
    /// words [rows, cols*bits/32], scales/biases [rows, cols/groupSize] (fp32) -> w [rows, cols] fp32.
    public static func affine(
        words: UnsafePointer<UInt32>, scales: UnsafePointer<Float>, biases: UnsafePointer<Float>, rows: Int, cols: Int,
        bits: Int, groupSize: Int, into w: UnsafeMutablePointer<Float>
    ) {
        let perWord = 32 / bits
        let mask = UInt32((1 << bits) - 1)
        let wordsPerRow = cols / perWord
        let groupsPerRow = cols / groupSize
        for r in 0..<rows {
            let rowWords = words + r * wordsPerRow
            let out = w + r * cols
            for c in 0..<cols {
                let q = (rowWords[c / perWord] >> UInt32((c % perWord) * bits)) & mask
                let g = r * groupsPerRow + c / groupSize
                let scaled = scales[g] * Float(q)
                out[c] = scaled + biases[g]
            }
        }
    }

    /// The same into fp16 (the iOS 18 kernel's inputs: dequantized in fp32, then rounded once to half).
    public static func affineToHalf(
        words: UnsafePointer<UInt32>, scales: UnsafePointer<Float>, biases: UnsafePointer<Float>, rows: Int, cols: Int,
        bits: Int, groupSize: Int, into w: UnsafeMutablePointer<Float16>
    ) {
        let row = UnsafeMutablePointer<Float>.allocate(capacity: cols)
        defer { row.deallocate() }
        for r in 0..<rows {
            affine(
                words: words + r * (cols * bits / 32), scales: scales + r * (cols / groupSize),
                biases: biases + r * (cols / groupSize), rows: 1, cols: cols, bits: bits, groupSize: groupSize, into: row)
            for c in 0..<cols { w[r * cols + c] = Float16(row[c]) }
        }
    }
}
