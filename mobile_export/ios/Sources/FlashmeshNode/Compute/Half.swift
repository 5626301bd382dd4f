/// fp16 -> fp32, exactly, by table: a 256 KiB table of every half's float value converts records and
/// scales at memory speed on CPUs without half-precision instructions.
enum Half {
    static let table: [Float] = (0...UInt16.max).map { Float(Float16(bitPattern: $0)) }

    static func widen(_ source: UnsafeRawPointer, count: Int, into destination: UnsafeMutablePointer<Float>) {
        let halves = source.assumingMemoryBound(to: UInt16.self)
        table.withUnsafeBufferPointer { t in
            for i in 0..<count { destination[i] = t[Int(halves[i])] }
        }
    }
}
