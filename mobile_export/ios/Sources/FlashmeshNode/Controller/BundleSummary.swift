/// What the app shows of a bundle before serving it, and of the share it would serve.
public struct BundleSummary: Equatable, Sendable {
    public let path: String
    public let modelType: String
    public let fingerprint: String
    public let target: String
    public let layers: Int
    /// Routed experts of the whole model, and of the share served.
    public let expertsTotal: Int
    public let expertsHeld: Int
    /// Flash bytes per decoded token with every expert missing (whole aligned records).
    public let bytesPerToken: Int
    public let share: Shard?
    /// Expert weights the share holds in RAM if all are cached, and the least a node can run on.
    public let heldBytes: Int
    public let minimumBudget: Int
    public let weights: String

    public init(_ bundle: ExpertBundle) {
        path = bundle.path
        modelType = bundle.modelType
        fingerprint = bundle.manifest.storeFingerprint
        target = bundle.manifest.target
        layers = bundle.layers.count
        expertsTotal = bundle.layers.reduce(0) { $0 + $1.numExperts }
        expertsHeld = bundle.layers.reduce(0) { $0 + $1.experts.count }
        bytesPerToken = bundle.manifest.bytesPerToken?.records
            ?? bundle.topK * bundle.layers.reduce(0) { $0 + $1.recordSize }
        share = bundle.shard
        heldBytes = bundle.layers.reduce(0) { $0 + $1.experts.count * $1.payloadBytes }
        minimumBudget = ExpertCache.minimumBudget(bundle)
        switch bundle.weights {
        case .float16: weights = "fp16 records (fp32 in RAM)"
        case let .affine(bits, group, offset):
            weights = "\(bits)-bit affine, groups of \(group)" + (offset == nil ? "" : " (int8 records)")
        }
    }

    /// "all experts", or "share 2 of 3 (2 replicas)": the --count/--index of `flashmesh node serve`.
    public var shareText: String {
        guard let share, share.count > 1 else { return "all experts" }
        let replicas = share.replicas > 1 ? " (\(share.replicas) replicas)" : ""
        return "share \(share.index + 1) of \(share.count)\(replicas): --count \(share.count) --index \(share.index)"
    }
}

/// The RAM budget a device allows for one share: at least what the node needs (the top-k experts of
/// a layer of each shape), at most what is held or what the device has free after a reserve for the
/// process itself (read buffers, messages, the app).
public struct BudgetBounds: Equatable, Sendable {
    public static let step = 64 * 1024 * 1024
    public let minimum: Int
    public let maximum: Int
    /// What the slider starts at: as much as is allowed.
    public var suggested: Int { maximum }
    public var isPossible: Bool { maximum >= minimum }

    /// `availableBytes`: memory the process may still allocate (iOS: os_proc_available_memory).
    public init(summary: BundleSummary, availableBytes: Int) {
        minimum = summary.minimumBudget
        let reserve = max(256 * 1024 * 1024, availableBytes / 8)
        let allowed = max(0, availableBytes - reserve) / BudgetBounds.step * BudgetBounds.step
        maximum = min(summary.heldBytes, allowed)
    }

    /// `bytes` within the bounds (on the step, except at the ends).
    public func clamp(_ bytes: Int) -> Int {
        guard isPossible else { return minimum }
        return min(maximum, max(minimum, bytes / BudgetBounds.step * BudgetBounds.step))
    }

    /// Why the share cannot be served here, or nil.
    public func problem(available: Int) -> String? {
        guard !isPossible else { return nil }
        return "this device has \(ByteSize.format(available)) free, and the node needs "
            + "\(ByteSize.format(minimum)) of RAM plus a reserve; close other apps or use a Mac for this bundle"
    }
}
