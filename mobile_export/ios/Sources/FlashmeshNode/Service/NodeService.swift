import Foundation

/// The node's request handling, transport-free (node/service.py): token check, validation, the cache
/// and compute behind one lane (one request computes at a time), statistics.
public final class NodeService: @unchecked Sendable {
    public struct Options: Sendable {
        public var ramBudget: Int
        public var token: String
        public var name: String
        public var pageCache = false
        public var verify = true
        public var maxMessageBytes = NodeMetadata.defaultMaxMessageBytes
        public var flashGBps: Double?  // nil: measured at start
        public var policy = ExpertCache.Policy.auto

        public init(ramBudget: Int, token: String, name: String) {
            self.ramBudget = ramBudget
            self.token = token
            self.name = name
        }
    }

    struct Counters {
        var requests = 0, pairs = 0, bytesIn = 0, bytesOut = 0, rejected = 0
        var busySeconds = 0.0
    }

    public let bundle: ExpertBundle
    public let options: Options
    public let nodeId: String
    public private(set) var flashGBps = 0.0
    let reader: RecordReader
    let dispatch: ExpertDispatch
    private let lane = NSLock()  // the cache and the compute belong to one request at a time
    private let counters = Locked(Counters())
    private let published = Locked((stats: ExpertCache.Stats(), bytes: 0))  // the cache as the last request left it
    private let started = monotonicSeconds()

    public init(bundle: ExpertBundle, options: Options, compute: any ExpertCompute = CPUExpertCompute())
        throws(UserError)
    {
        guard !options.token.isEmpty else { throw UserError("a node needs a cluster token") }
        self.bundle = bundle
        self.options = options
        nodeId = String(UUID().uuidString.lowercased().filter { $0 != "-" }.prefix(12))
        reader = try RecordReader(bundle: bundle, pageCache: options.pageCache, verify: options.verify)
        do {
            let cache = try ExpertCache(bundle: bundle, reader: reader, budgetBytes: options.ramBudget, policy: options.policy)
            try compute.prepare(memory: cache.memoryRegions)
            dispatch = ExpertDispatch(cache: cache, compute: compute)
        } catch {
            reader.close()
            throw error
        }
        flashGBps = options.flashGBps ?? measureReadGBps()
    }

    var cache: ExpertCache { dispatch.cache }

    /// What computes the experts (`ExpertCompute.name`).
    public var computeName: String { dispatch.compute.name }

    // MARK: - checks (any thread)

    public func checkToken(_ given: String?) throws(RequestError) {
        guard let given, constantTimeEqual(Array(given.utf8), Array(options.token.utf8)) else {
            counters.withLock { $0.rejected += 1 }
            throw RequestError(.unauthenticated, "missing or wrong cluster token")
        }
    }

    /// Counts a refused request and returns its error.
    public func invalid(_ message: String) -> RequestError {
        counters.withLock { $0.rejected += 1 }
        return RequestError(.invalidArgument, message)
    }

    // MARK: - RPCs

    public func info() -> NodeInfo {
        var info = NodeInfo()
        info.nodeId = nodeId
        info.name = options.name
        info.fingerprint = bundle.manifest.storeFingerprint
        info.protocolVersion = UInt32(BundleManifest.protocolVersion)
        info.layers = bundle.layers.map { plan in
            var holdings = LayerHoldings()
            holdings.layer = Int32(plan.layer)
            holdings.numExperts = Int32(plan.numExperts)
            holdings.experts = plan.experts.map { Int32($0) }
            holdings.expertBytes = Int64(plan.payloadBytes)
            return holdings
        }
        info.ramBudgetBytes = Int64(cache.budgetBytes)
        info.flashReadGbps = flashGBps
        info.maxMessageBytes = Int64(options.maxMessageBytes)
        info.hiddenSize = Int32(bundle.hiddenSize)
        info.modelType = bundle.modelType
        info.flashReader = "threads"  // RecordReader: pread on a pool of reader threads
        return info
    }

    /// `size`: the request's bytes as received.
    public func compute(_ request: ComputeRequest, size: Int) throws(RequestError) -> ComputeReply {
        let checked = try validate(request, size: size)
        let start = monotonicSeconds()
        let y: [Float]
        do {
            y = try onLane { () throws(RecordError) -> [Float] in
                if let next = request.next, !next.experts.isEmpty {
                    dispatch.hint(Int(next.layer), Array(Set(next.experts.map { Int($0) })).sorted())
                }
                return try dispatch.run(layer: Int(request.layer), x: checked.x, rows: checked.rows, experts: checked.experts)
            }
        } catch {
            throw RequestError(.dataLoss, "node \(options.name): \(error)", records: [(error.layer, error.expert)])
        }
        var reply = ComputeReply()
        var tensor = Tensor()
        tensor.dtype = "float32"
        tensor.shape = [Int64(checked.experts.count), Int64(bundle.hiddenSize)]
        tensor.data = y.withUnsafeBytes { Array($0) }  // little-endian fp32
        reply.y = tensor
        let seconds = monotonicSeconds() - start
        reply.computeSeconds = seconds
        let bytesOut = reply.serialized().count
        counters.withLock {
            $0.requests += 1
            $0.pairs += checked.experts.count
            $0.bytesIn += size
            $0.bytesOut += bytesOut
            $0.busySeconds += seconds
        }
        return reply
    }

    public func prefetch(_ request: PrefetchRequest) throws(RequestError) -> PrefetchReply {
        let layer = Int(request.layer)
        let experts = try checkHeld(layer, request.experts.map { Int($0) }, what: "prefetch")
        let start = monotonicSeconds()
        let resident = onLane { () -> Int in
            dispatch.prefetch(layer, experts)
            return experts.filter { cache.contains(ExpertCache.Key(layer, $0)) }.count
        }
        counters.withLock { $0.busySeconds += monotonicSeconds() - start }
        var reply = PrefetchReply()
        reply.resident = Int32(resident)
        return reply
    }

    public func stats() -> NodeStats {
        // The cache as the last request left it: Stats never waits for a compute in progress.
        let (s, bytes) = published.withLock { $0 }
        let c = counters.withLock { $0 }
        var stats = NodeStats()
        stats.hits = Int64(s.hits)
        stats.misses = Int64(s.misses)
        stats.evictions = Int64(s.evictions)
        stats.bytesRead = Int64(s.bytesRead)
        stats.ioSeconds = s.ioSeconds
        stats.computeSeconds = s.computeSeconds
        stats.peakCacheBytes = Int64(s.peakBytes)
        stats.cacheBytes = Int64(bytes)
        stats.ramBudgetBytes = Int64(cache.budgetBytes)
        stats.requests = Int64(c.requests)
        stats.pairs = Int64(c.pairs)
        stats.bytesIn = Int64(c.bytesIn)
        stats.bytesOut = Int64(c.bytesOut)
        stats.busySeconds = c.busySeconds
        stats.uptimeSeconds = monotonicSeconds() - started
        stats.rejected = Int64(c.rejected)
        stats.prefetched = Int64(s.prefetched)
        stats.prefetchUsed = Int64(s.prefetchUsed)
        return stats
    }

    public func health() -> HealthReply {
        var reply = HealthReply()
        reply.serving = true
        reply.nodeId = nodeId
        return reply
    }

    /// Lands reads in flight, then closes the record files.
    public func close() {
        onLane { cache.drain() }
        reader.close()
    }

    // MARK: - internals

    func onLane<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lane.lock()
        defer {
            published.withLock { $0 = (cache.stats, cache.bytes) }
            lane.unlock()
        }
        return try body()
    }

    /// Flash read bandwidth: parallel whole-record reads, the way the cache reads (up to 64 records, 64 MiB).
    private func measureReadGBps(maxBytes: Int = 64 * 1024 * 1024, maxRecords: Int = 64) -> Double {
        var jobs: [(LayerPlan, [Int])] = []
        var count = 0
        var bytes = 0
        for plan in bundle.layers {
            var experts: [Int] = []
            for e in plan.experts {
                if count >= maxRecords || count * plan.recordSize >= maxBytes { break }
                experts.append(e)
                count += 1
                bytes += plan.recordSize
            }
            if !experts.isEmpty { jobs.append((plan, experts)) }
        }
        guard !jobs.isEmpty else { return 0 }
        let start = monotonicSeconds()
        let reads = jobs.map { reader.submit($0.0, $0.1) }
        for read in reads {
            if let records = try? read.result() { records.values.forEach(reader.recycle) }
        }
        let seconds = monotonicSeconds() - start
        return seconds > 0 ? Double(bytes) / seconds / 1e9 : 0
    }
}

/// Compares secrets without an early exit on the first differing byte.
func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    guard a.count == b.count else { return false }
    return zip(a, b).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0
}
