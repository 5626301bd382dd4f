import Foundation

/// SwiGLU experts on the CPU: affine weights dequantized into fp32 scratch, then three BLAS products
/// (OpenBLAS here, Accelerate on Apple platforms) and SiLU in fp32, as mlx-lm's SwitchGLU computes.
public final class CPUExpertCompute: ExpertCompute, @unchecked Sendable {
    private let lock = NSLock()  // the scratch buffers below belong to one call at a time
    private var scratch: [Float] = []

    public init() {}

    #if canImport(Accelerate)
    public var name: String { "cpu (Accelerate)" }
    #else
    public var name: String { "cpu (OpenBLAS)" }
    #endif

    public func prepare(memory: [UnsafeRawBufferPointer]) {}

    public func swiglu(_ calls: [ExpertCall], x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
        for call in calls {
            let h = call.weights.hidden
            swiglu(call.weights, x: x + call.firstRow * h, rows: call.rows, y: y + call.firstRow * h)
        }
    }

    /// One expert: x [rows, H] -> y [rows, H].
    public func swiglu(_ weights: ExpertWeights, x: UnsafePointer<Float>, rows: Int, y: UnsafeMutablePointer<Float>) {
        lock.lock()
        defer { lock.unlock() }
        let h = weights.hidden
        let i = weights.intermediate
        let dense = [weights.gate, weights.up, weights.down].reduce(0) { $0 + (isAffine($1) ? $1.rows * $1.cols : 0) }
        let needed = dense + 2 * rows * i
        if scratch.count < needed { scratch = [Float](repeating: 0, count: needed) }
        scratch.withUnsafeMutableBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return }
            var next = base
            func matrix(_ m: WeightMatrix) -> UnsafePointer<Float> {
                switch m {
                case let .float32(pointer, _, _):
                    return pointer
                case let .affine(words, scales, biases, r, c, bits, group):
                    let out = next
                    next += r * c
                    Dequantize.affine(words: words, scales: scales, biases: biases, rows: r, cols: c, bits: bits,
                                      groupSize: group, into: out)
                    return UnsafePointer(out)
                }
            }
            let gate = matrix(weights.gate)
            let up = matrix(weights.up)
            let down = matrix(weights.down)
            let g = next  // [rows, I]
            let u = next + rows * i  // [rows, I]
            BLAS.multiplyTransposed(x, gate, m: rows, n: i, k: h, into: g)
            BLAS.multiplyTransposed(x, up, m: rows, n: i, k: h, into: u)
            for j in 0..<rows * i {
                let a = g[j]
                g[j] = a * (1 / (1 + exp(-a))) * u[j]  // silu(gate) * up
            }
            BLAS.multiplyTransposed(UnsafePointer(g), down, m: rows, n: h, k: i, into: y)
        }
    }

    private func isAffine(_ m: WeightMatrix) -> Bool {
        if case .affine = m { return true }
        return false
    }
}
