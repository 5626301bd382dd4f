/// One MoE layer's (row, expert) pairs computed from the cache: waves that fit the budget, experts
/// pinned while they compute, and read-ahead hints issued once a call's own experts are pinned
/// (node/compute.py `LocalExperts`). Used from one thread at a time (the service's compute lane).
public final class ExpertDispatch: @unchecked Sendable {
    public let cache: ExpertCache
    public let compute: any ExpertCompute
    private var pendingHint: (layer: Int, experts: [Int])?

    public init(cache: ExpertCache, compute: any ExpertCompute) {
        self.cache = cache
        self.compute = compute
    }

    /// x [M, H] fp32, pairs (rows[p], experts[p]) -> y [P, H] fp32: expert experts[p] applied to row rows[p].
    public func run(layer: Int, x: [Float], rows: [Int], experts: [Int]) throws(RecordError) -> [Float] {
        let hidden = cache.bundle.hiddenSize
        var y = [Float](repeating: 0, count: experts.count * hidden)
        let unique = Array(Set(experts)).sorted()
        let waves = cache.planWaves(layer, unique)
        if waves.count > 1 { pendingHint = nil }  // this layer alone overflows the budget: reading ahead would thrash
        for wave in waves {
            try runWave(layer, wave, x: x, rows: rows, experts: experts, y: &y, issueHint: waves.count == 1)
        }
        return y
    }

    /// Starts reading `experts` of `layer` into the cache (as many as fit); does not wait.
    public func prefetch(_ layer: Int, _ experts: [Int]) {
        cache.prefetch(layer, Array(Set(experts)).sorted())
    }

    /// Predicted experts of an upcoming layer: read once the next `run` has pinned its own experts.
    public func hint(_ layer: Int, _ experts: [Int]) {
        if let previous = pendingHint { prefetch(previous.layer, previous.experts) }
        pendingHint = (layer, experts)
    }

    private func runWave(
        _ layer: Int, _ wave: [Int], x: [Float], rows: [Int], experts: [Int], y: inout [Float], issueHint: Bool
    ) throws(RecordError) {
        let slots = try cache.acquire(layer, wave)
        defer { cache.release(layer, wave) }
        if issueHint, let hinted = pendingHint {
            pendingHint = nil
            if hinted.layer != layer { prefetch(hinted.layer, hinted.experts) }
        }
        guard let slab = cache.slab(layer), let plan = cache.bundle.layer(layer) else { return }
        let start = monotonicSeconds()
        let hidden = cache.bundle.hiddenSize
        let inWave = Set(wave)
        var pairsOf: [Int: [Int]] = [:]
        for (p, e) in experts.enumerated() where inWave.contains(e) { pairsOf[e, default: []].append(p) }
        // The wave's rows grouped by expert: xs [n, H], one batched call, ys scattered back to y.
        var calls: [ExpertCall] = []
        var order: [Int] = []  // pair index of each row of xs
        for expert in wave {
            guard let pairs = pairsOf[expert], let slot = slots[expert] else { continue }
            let weights = ExpertDispatch.weights(slab, slot: slot, plan: plan, bundle: cache.bundle)
            calls.append(ExpertCall(weights: weights, firstRow: order.count, rows: pairs.count))
            order += pairs
        }
        guard !calls.isEmpty else { return }
        var xs = [Float](repeating: 0, count: order.count * hidden)
        for (j, p) in order.enumerated() {
            xs.replaceSubrange(j * hidden..<(j + 1) * hidden, with: x[rows[p] * hidden..<(rows[p] + 1) * hidden])
        }
        var ys = [Float](repeating: 0, count: order.count * hidden)
        xs.withUnsafeBufferPointer { xp in
            ys.withUnsafeMutableBufferPointer { yp in
                guard let xb = xp.baseAddress, let yb = yp.baseAddress else { return }
                compute.swiglu(calls, x: xb, y: yb)
            }
        }
        for (j, p) in order.enumerated() {
            y.replaceSubrange(p * hidden..<(p + 1) * hidden, with: ys[j * hidden..<(j + 1) * hidden])
        }
        cache.addComputeSeconds(monotonicSeconds() - start)
    }

    /// The expert in `slot` as weight matrices over the slab's memory.
    static func weights(_ slab: Slab, slot: Int, plan: LayerPlan, bundle: ExpertBundle) -> ExpertWeights {
        func tensor(_ name: String) -> (pointer: UnsafeMutableRawPointer, shape: [Int]) {
            let index = slab.tensors.firstIndex { $0.name == name } ?? 0
            return (slab.pointer(tensor: index, slot: slot), slab.tensors[index].shape)
        }
        func matrix(_ projection: String) -> WeightMatrix {
            let w = tensor(projection + ".weight")
            switch bundle.weights {
            case .float16:
                return .float32(UnsafePointer(w.pointer.assumingMemoryBound(to: Float.self)), rows: w.shape[0], cols: w.shape[1])
            case let .affine(bits, group, _):
                let scales = tensor(projection + ".scales").pointer.assumingMemoryBound(to: Float.self)
                let biases = tensor(projection + ".biases").pointer.assumingMemoryBound(to: Float.self)
                return .affine(
                    words: UnsafePointer(w.pointer.assumingMemoryBound(to: UInt32.self)), scales: UnsafePointer(scales),
                    biases: UnsafePointer(biases), rows: w.shape[0], cols: w.shape[1] * 32 / bits, bits: bits,
                    groupSize: group)
            }
        }
        return ExpertWeights(gate: matrix("gate_proj"), up: matrix("up_proj"), down: matrix("down_proj"))
    }
}
