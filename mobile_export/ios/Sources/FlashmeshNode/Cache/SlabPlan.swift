extension ExpertCache {
    /// The smallest budget a cache of `bundle` accepts: the top-k experts of one layer of each shape.
    public static func minimumBudget(_ bundle: ExpertBundle) -> Int {
        var seen: Set<[RAMTensor]> = []
        let perShape = bundle.layers.filter { seen.insert($0.signature).inserted }.reduce(0) { $0 + bundle.topK * $1.payloadBytes }
        return max(bundle.minimumBudget, perShape)
    }
}

extension Slab {
    /// One slab per expert shape, its slots the budget's share (by expert bytes), at most one per
    /// expert (node/cache.py `_make_slabs`); the slabs by layer, and each slab once.
    static func plan(_ bundle: ExpertBundle, budgetBytes: Int) throws(UserError) -> ([Int: Slab], [Slab]) {
        var order: [[RAMTensor]] = []
        var groups: [[RAMTensor]: [LayerPlan]] = [:]
        for plan in bundle.layers {
            if groups[plan.signature] == nil { order.append(plan.signature) }
            groups[plan.signature, default: []].append(plan)
        }
        let held = groups.mapValues { $0.reduce(0) { $0 + $1.experts.count } }
        let total = max(1, order.reduce(0) { $0 + (held[$1] ?? 0) * (groups[$1]?[0].payloadBytes ?? 0) })
        let k = bundle.topK
        var slots: [[RAMTensor]: Int] = [:]
        for sig in order {
            let payload = groups[sig]?[0].payloadBytes ?? 1
            let product = budgetBytes.multipliedFullWidth(by: (held[sig] ?? 0) * payload)
            let share = total.dividingFullWidth(product).quotient  // budget * held * payload // total, without overflow
            slots[sig] = min(max(k, share / payload), held[sig] ?? 0)
        }
        let needed = order.reduce(0) { $0 + max(slots[$1] ?? 0, k) * (groups[$1]?[0].payloadBytes ?? 0) }
        if needed > budgetBytes {
            let minimum = order.reduce(0) { $0 + k * (groups[$1]?[0].payloadBytes ?? 0) }
            throw UserError(
                "RAM budget \(ByteSize.format(budgetBytes)) is below this model's minimum \(ByteSize.format(minimum)) "
                    + "(the top-k experts of one layer of each expert shape); pass --ram-budget \(minimum) or more")
        }
        var byLayer: [Int: Slab] = [:]
        var distinct: [Slab] = []
        for sig in order {
            let slab = Slab(tensors: sig, slots: slots[sig] ?? 0, experts: held[sig] ?? 0)
            distinct.append(slab)
            for plan in groups[sig] ?? [] { byLayer[plan.layer] = slab }
        }
        return (byLayer, distinct)
    }
}
