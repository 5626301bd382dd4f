/// The node's RAM cache of experts under a hard byte budget: the same decisions as node/cache.py.
///
/// Entries are whole experts in slots of preallocated slabs (one per expert shape, slots by the
/// budget's share). The experts a call needs are pinned while it runs; the rest are evicted by the
/// policy. `auto` (the Python node's default) is `lfu`, LFU with aging: on realistic routing it
/// hits more than LRU and cyclic at every budget (docs/benchmarks.md). Prefetches reserve their slots at once and land on
/// the next `acquire` of their layer. Not thread-safe: the service calls it from one compute lane.
public final class ExpertCache: @unchecked Sendable {
    public enum Policy: String, CaseIterable, Sendable {
        case auto, lru, lfu, cyclic
    }

    public let budgetBytes: Int
    public let policy: Policy
    public let bundle: ExpertBundle
    public private(set) var stats = Stats()
    /// Bytes of resident experts and of reads in flight.
    public private(set) var bytes = 0

    let reader: RecordReader
    private let lfuDecay: Double
    private let slabs: [Int: Slab]  // layer -> its slab (shared by same-shape layers)
    private let distinctSlabs: [Slab]
    private let plans: [Int: LayerPlan]
    private let position: [Int: Int]
    private var entries: [Key: (slot: Int, stamp: Int)] = [:]
    private var stamp = 0  // recency: a larger stamp is more recent
    private var reserved: [Key: Int] = [:]
    private var pinned: Set<Key> = []
    private var pending: [(layer: Int, read: PendingRead)] = []  // in submission order
    private var unusedPrefetch: Set<Key> = []
    private var frequency: [Key: Double] = [:]
    private var clock = 1.0
    private var now = 0

    public init(
        bundle: ExpertBundle, reader: RecordReader, budgetBytes: Int, policy: Policy = .auto, lfuDecay: Double = 0.999
    ) throws(UserError) {
        let minimum = bundle.minimumBudget
        guard budgetBytes >= minimum else {
            throw UserError(
                "RAM budget \(ByteSize.format(budgetBytes)) is below this model's minimum \(ByteSize.format(minimum)) "
                    + "(the top-k experts of one layer); pass --ram-budget \(minimum) or more")
        }
        self.bundle = bundle
        self.reader = reader
        self.budgetBytes = budgetBytes
        self.policy = policy
        self.lfuDecay = lfuDecay
        (slabs, distinctSlabs) = try Slab.plan(bundle, budgetBytes: budgetBytes)
        plans = Dictionary(uniqueKeysWithValues: bundle.layers.map { ($0.layer, $0) })
        position = Dictionary(uniqueKeysWithValues: bundle.layers.enumerated().map { ($1.layer, $0) })
    }

    public func slab(_ layer: Int) -> Slab? { slabs[layer] }

    /// All the memory experts are held in (every slab's regions).
    public var memoryRegions: [UnsafeRawBufferPointer] { distinctSlabs.flatMap(\.regions) }

    /// Resident, or read ahead and in flight.
    public func contains(_ key: Key) -> Bool {
        entries[key] != nil || pending.contains { $0.layer == key.layer && $0.read.experts.contains(key.expert) }
    }

    /// Resident experts, sorted.
    public var residentKeys: [Key] { entries.keys.sorted() }

    public var effectivePolicy: Policy {
        policy == .auto ? .lfu : policy
    }

    /// Splits `experts` into groups that each fit the layer's slots; resident experts go first.
    public func planWaves(_ layer: Int, _ experts: [Int]) -> [[Int]] {
        guard let capacity = slabs[layer]?.slots, capacity > 0 else { return [experts] }
        let resident = experts.filter { contains(Key(layer, $0)) }
        let ordered = resident + experts.filter { !contains(Key(layer, $0)) }
        return stride(from: 0, to: ordered.count, by: capacity).map { Array(ordered[$0..<min($0 + capacity, ordered.count)]) }
    }

    /// Makes `experts` resident (reading misses in parallel), pins them until `release`; returns
    /// expert -> its slot in `slab(layer)`.
    public func acquire(_ layer: Int, _ experts: [Int]) throws(RecordError) -> [Int: Int] {
        guard let plan = plans[layer], let slab = slabs[layer] else { return [:] }
        precondition(experts.count <= slab.slots, "acquire() asked for more than the budget; use planWaves()")
        now = position[layer] ?? 0
        clock /= lfuDecay
        if clock > 1e100 {  // renormalise the decayed counts before floats overflow
            frequency = frequency.mapValues { $0 / clock }
            clock = 1
        }
        let fresh = experts.filter { !contains(Key(layer, $0)) }  // neither resident nor read ahead
        for e in experts { pinned.insert(Key(layer, e)) }
        // Room for the misses is made before this layer's read-aheads land, as node/cache.py does (it
        // reads the misses first): read-aheads in flight are not evictable.
        if !fresh.isEmpty { makeRoom(layer, count: fresh.count) }
        collect(layer)
        let lost = experts.filter { entries[Key(layer, $0)] == nil && !fresh.contains($0) }  // a failed read-ahead
        let missing = fresh + lost
        if !lost.isEmpty { makeRoom(layer, count: missing.count) }  // the misses take their slots below
        stats.hits += experts.count - missing.count
        stats.misses += missing.count
        for e in experts where entries[Key(layer, e)] != nil {
            let key = Key(layer, e)
            if unusedPrefetch.remove(key) != nil { stats.prefetchUsed += 1 }
            touch(key)
        }
        if !missing.isEmpty {
            let records: [Int: AlignedBuffer]
            let before: RecordReader.Stats
            do {
                before = reader.stats
                records = try reader.read(plan, missing)
            } catch {
                release(layer, experts)  // a failed read must not leave pins behind
                throw error
            }
            stats.bytesRead += missing.count * plan.recordSize  // as issued, like read-aheads and node/cache.py
            stats.ioSeconds += reader.stats.seconds - before.seconds
            for e in missing {
                guard let record = records[e] else { continue }
                let slot = slab.take()
                RecordConversion.fill(slab, slot: slot, record: record.pointer, layer: plan, weights: bundle.weights)
                reader.recycle(record)
                insert(Key(layer, e), slot: slot)
                touch(Key(layer, e))
                bytes += plan.payloadBytes
            }
            stats.peakBytes = max(stats.peakBytes, bytes)
        }
        var slots: [Int: Int] = [:]
        for e in experts { slots[e] = entries[Key(layer, e)]?.slot }
        return slots
    }

    public func release(_ layer: Int, _ experts: [Int]) {
        for e in experts { pinned.remove(Key(layer, e)) }
    }

    /// Starts reading `experts` of `layer` that are neither resident nor in flight, as many as fit after
    /// evicting unpinned entries; returns the experts submitted. Does not wait.
    @discardableResult
    public func prefetch(_ layer: Int, _ experts: [Int]) -> [Int] {
        guard let plan = plans[layer], let slab = slabs[layer] else { return [] }
        if pending.contains(where: { $0.layer == layer }) { collect(layer) }  // one batch in flight per layer
        var seen: Set<Int> = []
        var wanted = experts.filter { seen.insert($0).inserted && entries[Key(layer, $0)] == nil }
        wanted = Array(wanted.prefix(freeRoom(slab, limit: wanted.count)))
        guard !wanted.isEmpty else { return [] }
        // A read-ahead evicts what is needed furthest in layer order, whatever the policy: under LRU the
        // oldest entries are those of the very next layers, which a prefetch must not displace.
        makeRoom(layer, count: wanted.count, policy: .cyclic)
        for e in wanted { reserved[Key(layer, e)] = slab.take() }
        bytes += wanted.count * plan.payloadBytes
        stats.peakBytes = max(stats.peakBytes, bytes)
        pending.append((layer, reader.submit(plan, wanted)))
        stats.bytesRead += wanted.count * plan.recordSize
        stats.prefetched += wanted.count
        for e in wanted { unusedPrefetch.insert(Key(layer, e)) }
        return wanted
    }

    /// Finishes every prefetch in flight (before closing, or to measure).
    public func drain() {
        for layer in pending.map(\.layer) { collect(layer) }
    }

    /// Adds compute time measured by the caller.
    public func addComputeSeconds(_ seconds: Double) {
        stats.computeSeconds += seconds
    }

    // MARK: - internals

    private func insert(_ key: Key, slot: Int) {
        stamp += 1
        entries[key] = (slot, stamp)
    }

    private func touch(_ key: Key) {
        guard let entry = entries[key] else { return }
        stamp += 1
        entries[key] = (entry.slot, stamp)
        if effectivePolicy == .lfu { frequency[key, default: 0] += clock }
    }

    /// Turns `layer`'s read-ahead into entries (waiting for reads still in flight).
    private func collect(_ layer: Int) {
        guard let index = pending.firstIndex(where: { $0.layer == layer }), let plan = plans[layer],
            let slab = slabs[layer]
        else { return }
        let read = pending.remove(at: index).read
        let start = monotonicSeconds()
        var slots: [(expert: Int, slot: Int)] = []
        for e in read.experts {
            if let slot = reserved.removeValue(forKey: Key(layer, e)) { slots.append((e, slot)) }
        }
        let records: [Int: AlignedBuffer]
        do {
            records = try read.result()
        } catch {
            // A read-ahead is a hint: drop the batch and give its room back; a damaged record is reported
            // by the acquire that needs it, to the request that asked for it.
            Log.warning("read-ahead of layer \(layer) dropped: \(error)")
            for (e, slot) in slots {
                slab.giveBack(slot)
                unusedPrefetch.remove(Key(layer, e))
            }
            bytes -= slots.count * plan.payloadBytes
            return
        }
        let waited = monotonicSeconds() - start
        stats.prefetchWaitSeconds += waited
        stats.ioSeconds += waited
        for (e, slot) in slots {
            guard let record = records[e] else { continue }
            RecordConversion.fill(slab, slot: slot, record: record.pointer, layer: plan, weights: bundle.weights)
            reader.recycle(record)
            insert(Key(layer, e), slot: slot)
        }
    }

    private func freeRoom(_ slab: Slab, limit: Int) -> Int {
        let evictable = entries.keys.filter { !pinned.contains($0) && slabs[$0.layer] === slab }.count
        return min(limit, slab.freeSlots + evictable)
    }

    private func makeRoom(_ layer: Int, count: Int, policy: Policy? = nil) {
        guard let slab = slabs[layer] else { return }
        evict(slab, count: count, policy: policy)
        if slab.freeSlots < count && !pending.isEmpty {
            drain()  // reads in flight hold reserved slots: land them so they can be evicted
            evict(slab, count: count, policy: policy)
        }
        precondition(slab.freeSlots >= count, "expert cache: pinned experts leave no room (a bug in wave planning)")
    }

    /// Entries in the order the policy evicts them.
    private func victims(_ policy: Policy) -> [Key] {
        let byRecency = entries.sorted { $0.value.stamp < $1.value.stamp }
        switch policy {
        case .auto, .lru:
            return byRecency.map(\.key)
        case .lfu:  // stable: recency breaks ties
            return byRecency.enumerated().sorted {
                let (a, b) = (frequency[$0.element.key] ?? 0, frequency[$1.element.key] ?? 0)
                return a != b ? a < b : $0.offset < $1.offset
            }.map(\.element.key)
        case .cyclic:
            // distance, in layers, until the key's layer is computed again (0 = the layer after this one)
            let n = position.count
            func distance(_ key: Key) -> Int { (((position[key.layer] ?? 0) - now - 1) % n + n) % n }
            return byRecency.enumerated().sorted {
                let (a, b) = (distance($0.element.key), distance($1.element.key))
                return a != b ? a > b : $0.offset < $1.offset
            }.map(\.element.key)
        }
    }

    private func evict(_ slab: Slab, count: Int, policy: Policy?) {
        guard slab.freeSlots < count else { return }
        for key in victims(policy ?? effectivePolicy) {
            if slab.freeSlots >= count { return }
            guard !pinned.contains(key), slabs[key.layer] === slab, let entry = entries.removeValue(forKey: key) else {
                continue
            }
            slab.giveBack(entry.slot)
            bytes -= plans[key.layer]?.payloadBytes ?? 0
            stats.evictions += 1
            if unusedPrefetch.remove(key) != nil { stats.prefetchWasted += 1 }
        }
    }
}
