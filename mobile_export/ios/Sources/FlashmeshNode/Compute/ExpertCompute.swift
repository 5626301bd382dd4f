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

/// One expert's part of a batched call: its weights and the rows of x and y it owns.
public struct ExpertCall: Sendable {
    public let weights: ExpertWeights
    /// The expert's rows are x[firstRow ..< firstRow + rows] and the same rows of y.
    public let firstRow: Int
    public let rows: Int

    public init(weights: ExpertWeights, firstRow: Int, rows: Int) {
        self.weights = weights
        self.firstRow = firstRow
        self.rows = rows
    }
}

/// Expert FFN compute: the CPU (`CPUExpertCompute`) or a GPU (FlashmeshPlatform's Metal backend);
/// the choice is made in one place, FlashmeshPlatform's `ExpertComputeChoice`.
public protocol ExpertCompute: Sendable {
    /// What the node runs on, for people ("cpu (OpenBLAS)", "gpu (Metal, Apple A17 Pro GPU)").
    var name: String { get }

    /// The memory every weight pointer will point into (the cache's slabs, 16 KiB aligned, allocated
    /// once), given before the first call: a GPU backend maps it without copying; the CPU ignores it.
    func prepare(memory: [UnsafeRawBufferPointer]) throws(UserError)

    /// For each call c: y[r] = down(silu(gate(x[r])) * up(x[r])) for its rows r; x and y are
    /// [total rows, H] fp32. Called from one thread at a time.
    func swiglu(_ calls: [ExpertCall], x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>)
}
