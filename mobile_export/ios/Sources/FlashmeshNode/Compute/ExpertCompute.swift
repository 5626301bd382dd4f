/// One weight matrix of an expert, `rows` x `cols` (row-major, as mlx-lm's linear weights: out x in),
/// as the cache holds it.
public enum WeightMatrix: @unchecked Sendable {
    case float32(UnsafePointer<Float>, rows: Int, cols: Int)
    /// Affine b-bit: `words` [rows, cols*bits/32] (MLX packing, first value in the lowest bits),
    /// `scales`/`biases` [rows, cols/groupSize]; w = scale * q + bias.
    case affine(
        words: UnsafePointer<UInt32>, scales: UnsafePointer<Float>, biases: UnsafePointer<Float>, rows: Int, cols: Int,
        bits: Int, groupSize: Int)

    public var rows: Int {
        switch self {
        case let .float32(_, rows, _), let .affine(_, _, _, rows, _, _, _): return rows
        }
    }

    public var cols: Int {
        switch self {
        case let .float32(_, _, cols), let .affine(_, _, _, _, cols, _, _): return cols
        }
    }
}

/// A SwiGLU expert's weights: gate and up [I, H], down [H, I].
public struct ExpertWeights: Sendable {
    public let gate: WeightMatrix
    public let up: WeightMatrix
    public let down: WeightMatrix

    public init(gate: WeightMatrix, up: WeightMatrix, down: WeightMatrix) {
        self.gate = gate
        self.up = up
        self.down = down
    }

    public var hidden: Int { gate.cols }
    public var intermediate: Int { gate.rows }
}

/// Expert FFN compute: the boundary a GPU backend (Metal, the bundle's Core ML kernel) implements too.
public protocol ExpertCompute: Sendable {
    /// y[r] = down(silu(gate(x[r])) * up(x[r])) for `rows` rows of x [rows, H] -> y [rows, H], fp32.
    /// Called from one thread at a time.
    func swiglu(_ weights: ExpertWeights, x: UnsafePointer<Float>, rows: Int, y: UnsafeMutablePointer<Float>)
}
