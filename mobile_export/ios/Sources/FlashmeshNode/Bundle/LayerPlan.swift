/// Element types of the tensors a node handles.
public enum ElementType: String, Sendable, Equatable {
    case float32, float16, uint32, int8

    public var size: Int {
        switch self {
        case .float32, .uint32: return 4
        case .float16: return 2
        case .int8: return 1
        }
    }
}

/// One tensor of an expert as the cache holds it.
public struct RAMTensor: Equatable, Hashable, Sendable {
    public let name: String
    public let type: ElementType
    public let shape: [Int]

    public var nbytes: Int { shape.reduce(type.size, *) }
}

/// Which experts of each layer a node serves: all, or those `flashmesh shard --count N --index I
/// --replicas R` would put in shard I (expert e goes to shards (e + r) mod N for r < R).
public struct Shard: Equatable, Sendable {
    public let count: Int
    public let index: Int
    public let replicas: Int

    public init(count: Int, index: Int, replicas: Int = 1) throws(UserError) {
        guard count >= 1, (0..<count).contains(index), (1...count).contains(replicas) else {
            throw UserError(
                "shard \(index) of \(count) with \(replicas) replicas: need 0 <= index < count, 1 <= replicas <= count")
        }
        self.count = count
        self.index = index
        self.replicas = replicas
    }

    /// node/shard.py `shard_experts`.
    public func holds(_ expert: Int) -> Bool {
        (0..<replicas).contains { (expert + $0) % count == index }
    }
}

/// One MoE layer as this node serves it: the records on flash, the tensors in RAM, the experts held.
public struct LayerPlan: Sendable {
    public let layer: Int
    public let numExperts: Int
    public let file: String
    public let recordSize: Int
    public let recordTensors: [String: TensorEntry]
    /// Tensors of one cached expert (node/bundle_source.py `_ram_spec`), in name order.
    public let ram: [RAMTensor]
    /// Experts this node serves, in file order.
    public let experts: [Int]
    private let slots: [Int: (position: Int, checksum: String)]
    private let served: Set<Int>

    init(record: RecordLayout, ram: [RAMTensor], shard: Shard?) {
        layer = record.layer
        numExperts = record.numExperts
        file = record.file
        recordSize = record.recordSize
        recordTensors = Dictionary(record.tensors.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        self.ram = ram.sorted { $0.name < $1.name }
        var slots: [Int: (Int, String)] = [:]
        for (position, expert) in record.experts.enumerated() where position < record.checksums.count {
            slots[expert] = (position, record.checksums[position])
        }
        self.slots = slots
        experts = record.experts.filter { shard?.holds($0) ?? true }
        served = Set(experts)
    }

    /// Bytes one cached expert costs (what the budget counts and `NodeInfo.expert_bytes` reports).
    public var payloadBytes: Int { ram.reduce(0) { $0 + $1.nbytes } }

    /// What decides whether two layers' experts can share a slab.
    public var signature: [RAMTensor] { ram }

    public func holds(_ expert: Int) -> Bool {
        served.contains(expert)
    }

    /// Byte offset of `expert`'s record in the layer file.
    public func recordOffset(_ expert: Int) -> Int? {
        slots[expert].map { $0.position * recordSize }
    }

    public func recordChecksum(_ expert: Int) -> String? {
        slots[expert]?.checksum
    }
}
