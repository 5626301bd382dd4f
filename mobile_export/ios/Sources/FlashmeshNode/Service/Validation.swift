/// Request validation, the same checks and messages as node/service.py `_validate_compute`; runs on
/// the calling thread before any work, so a bad request costs nothing but a reply.
extension NodeService {
    struct CheckedCompute {
        let x: [Float]  // [M, H]
        let rows: [Int]
        let experts: [Int]
    }

    func validate(_ request: ComputeRequest, size: Int) throws(RequestError) -> CheckedCompute {
        let limit = options.maxMessageBytes
        guard size <= limit else { throw invalid("request of \(size) bytes exceeds this node's limit of \(limit)") }
        let layer = Int(request.layer)
        let plan = try checkLayer(layer)
        let x: TensorView, rows: TensorView, experts: TensorView
        do {
            x = try TensorView(request.x ?? Tensor())
            rows = try TensorView(request.rows ?? Tensor())
            experts = try TensorView(request.experts ?? Tensor())
        } catch {
            throw invalid(error.reason)
        }
        let hidden = bundle.hiddenSize
        guard TensorView.floatTypes.contains(x.dtype), x.shape.count == 2, x.shape[1] == hidden, x.shape[0] > 0 else {
            throw invalid("x must be a float tensor [M, \(hidden)] with M > 0, got \(x.dtype) \(x.shape)")
        }
        guard x.allFinite else { throw invalid("x holds NaN or infinite values") }
        for (label, t) in [("rows", rows), ("experts", experts)] where t.dtype != "int32" || t.shape.count != 1 {
            throw invalid("\(label) must be an int32 vector, got \(t.dtype) \(t.shape)")
        }
        let m = x.shape[0]
        let rowIndex = rows.int32s()
        let expertIds = experts.int32s()
        guard rowIndex.count == expertIds.count, !rowIndex.isEmpty else {
            throw invalid("rows and experts must have the same non-zero length, got \(rowIndex.count) and \(expertIds.count)")
        }
        guard rowIndex.count <= m * bundle.topK else {
            throw invalid("\(rowIndex.count) pairs for \(m) tokens exceeds top-k \(bundle.topK) per token")
        }
        guard rowIndex.allSatisfy({ (0..<m).contains($0) }) else { throw invalid("rows must index the \(m) rows of x") }
        let bad = Array(Set(expertIds.filter { !plan.holds($0) })).sorted()
        guard bad.isEmpty else {
            throw invalid("layer \(layer): experts \(Array(bad.prefix(8))) are not held by node \(options.name)")
        }
        if let next = request.next {
            _ = try checkHeld(Int(next.layer), next.experts.map { Int($0) }, what: "hint")
        }
        return CheckedCompute(x: x.floats(), rows: rowIndex, experts: expertIds)
    }

    func checkLayer(_ layer: Int) throws(RequestError) -> LayerPlan {
        guard let plan = bundle.layer(layer) else { throw invalid("layer \(layer) is not a MoE layer of this model") }
        return plan
    }

    /// `experts` sorted and without repeats, if this node holds them all.
    func checkHeld(_ layer: Int, _ experts: [Int], what: String) throws(RequestError) -> [Int] {
        let plan = try checkLayer(layer)
        let wanted = Array(Set(experts)).sorted()
        guard wanted.allSatisfy(plan.holds) else {
            throw invalid("layer \(layer): \(what) names experts not held by node \(options.name)")
        }
        return wanted
    }
}
