import XCTest

@testable import FlashmeshNode

/// The cache replays the Python node's trace (acquires split into waves, prefetches) with the same
/// budget: hits, misses, evictions, bytes and the resident set equal after every step. Driven by the
/// vectors: they record the Python node's default policy, which the Swift node's default must match.
final class CacheTests: XCTestCase {
    func testTraceEqualsThePythonCache() throws {
        let v = try loadVectors()
        XCTAssertEqual(v.cache.count, 3)
        var evictingTraces = 0
        for trace in v.cache {
            XCTAssertEqual(ExpertCache.Policy.auto.rawValue, trace.policy,
                           "the Python node's default cache policy is now '\(trace.policy)': make it the Swift node's")
            let bundle = try ExpertBundle.open(Vectors.path(trace.bundle))
            let reader = try RecordReader(bundle: bundle)
            defer { reader.close() }
            let cache = try ExpertCache(bundle: bundle, reader: reader, budgetBytes: trace.budget)
            XCTAssertEqual(cache.effectivePolicy.rawValue, trace.effective_policy)
            for (i, step) in trace.steps.enumerated() {
                if step.op == "prefetch" {
                    cache.prefetch(step.layer, step.experts)
                } else {
                    for wave in cache.planWaves(step.layer, step.experts) {
                        _ = try cache.acquire(step.layer, wave)
                        cache.release(step.layer, wave)
                    }
                }
                let s = cache.stats
                let got = Vectors.Trace.Step.After(
                    hits: s.hits, misses: s.misses, evictions: s.evictions, bytes_read: s.bytesRead,
                    prefetched: s.prefetched, prefetch_used: s.prefetchUsed, prefetch_wasted: s.prefetchWasted,
                    bytes: cache.bytes, resident: cache.residentKeys.map { [$0.layer, $0.expert] })
                XCTAssertEqual(got, step.after, "budget \(trace.budget), step \(i) (\(step.op) layer \(step.layer) \(step.experts))")
                if got != step.after { break }
            }
            if cache.stats.evictions > 0 { evictingTraces += 1 }
            cache.drain()
        }
        XCTAssertTrue(evictingTraces >= 1, "the traces exercise the default policy's evictions")
    }
}
