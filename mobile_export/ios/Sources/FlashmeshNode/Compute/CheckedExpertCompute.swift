import Foundation

/// A backend that is trusted only after it agrees with a reference: the first call of each expert
/// shape is computed by both and compared; a disagreement (or a backend error) switches to the
/// reference for good, with a warning. Guards GPU code that these machines cannot run.
public final class CheckedExpertCompute: ExpertCompute, @unchecked Sendable {
    /// fp32 both ways from the same weights: they differ in summation order only (ComputeTests).
    public static let relativeTolerance: Float = 1e-3
    private let candidate: any ExpertCompute
    private let reference: any ExpertCompute
    private let state = Locked<(checked: Set<[Int]>, failure: String?)>(([], nil))

    public init(_ candidate: any ExpertCompute, reference: any ExpertCompute = CPUExpertCompute()) {
        self.candidate = candidate
        self.reference = reference
    }

    public var name: String {
        guard let failure = state.withLock({ $0.failure }) else { return candidate.name }
        return "\(reference.name), not \(candidate.name): \(failure)"
    }

    /// Why the candidate was dropped, or nil while it is in use.
    public var failure: String? { state.withLock { $0.failure } }

    public func prepare(memory: [UnsafeRawBufferPointer]) throws(UserError) {
        try reference.prepare(memory: memory)
        do {
            try candidate.prepare(memory: memory)
        } catch {
            drop("\(error)")
        }
    }

    public func swiglu(_ calls: [ExpertCall], x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
        let (checked, failed) = state.withLock { ($0.checked, $0.failure != nil) }
        if failed { return reference.swiglu(calls, x: x, y: y) }
        let shapes = Set(calls.map(CheckedExpertCompute.shape))
        guard !shapes.isSubset(of: checked) else { return candidate.swiglu(calls, x: x, y: y) }
        let hidden = calls.first?.weights.hidden ?? 0
        let count = (calls.map { $0.firstRow + $0.rows }.max() ?? 0) * hidden
        var want = [Float](repeating: 0, count: count)
        want.withUnsafeMutableBufferPointer { reference.swiglu(calls, x: x, y: $0.baseAddress!) }
        candidate.swiglu(calls, x: x, y: y)
        let scale = want.reduce(0) { max($0, abs($1)) }
        var error: Float = 0
        for i in 0..<count { error = max(error, abs(y[i] - want[i])) }
        if !(error <= CheckedExpertCompute.relativeTolerance * max(scale, .leastNormalMagnitude)) {
            drop(String(format: "its outputs differed from the CPU's by %.2g x max|y|", Double(error / max(scale, 1e-30))))
            (y).update(from: want, count: count)
            return
        }
        state.withLock { $0.checked.formUnion(shapes) }
    }

    private func drop(_ why: String) {
        state.withLock { $0.failure = $0.failure ?? why }
        Log.warning("expert compute: using \(reference.name) instead of \(candidate.name): \(why)")
    }

    /// What makes two calls' kernels differ: the widths and the weight format.
    static func shape(_ call: ExpertCall) -> [Int] {
        let w = call.weights
        return [w.gate, w.up, w.down].flatMap { m -> [Int] in
            switch m {
            case let .float32(_, rows, cols): return [rows, cols, 32]
            case let .affine(_, _, _, rows, cols, bits, group): return [rows, cols, bits, group]
            }
        }
    }
}
