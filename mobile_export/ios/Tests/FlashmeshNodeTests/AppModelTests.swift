import XCTest

@testable import FlashmeshNode

/// What the iOS app shows and advertises, computed by the library (the app only displays it).
final class AdvertisementTests: XCTestCase {
    /// The TXT record bytes and instance label equal what `flashmesh node serve` registers by zeroconf.
    func testTXTRecordAndInstanceNameEqualPythonsAdvertisement() throws {
        let v = try loadVectors()
        XCTAssertGreaterThanOrEqual(v.advertisements.count, 5)
        for entry in v.advertisements {
            let ad = Advertisement(name: entry.name, nodeId: entry.node_id, fingerprint: entry.fingerprint, port: entry.port)
            XCTAssertEqual(ad.txtRecord.map { String(format: "%02x", $0) }.joined(), entry.txt_hex, entry.name)
            XCTAssertEqual(ad.instanceName, entry.instance, entry.name)
        }
        XCTAssertEqual(Advertisement.serviceType + ".local.", "_flashmesh._tcp.local.")
    }

    func testScopeFollowsTheListeningAddress() {
        XCTAssertEqual(AdvertiseScope.matching(host: "127.0.0.1"), .localOnly)
        XCTAssertEqual(AdvertiseScope.matching(host: "0.0.0.0"), .everyInterface)
        XCTAssertNil(AdvertiseScope.matching(host: "203.0.113.7"))  // TEST-NET-3: held by no interface here
        guard let other = NetworkInterfaces.ipv4Addresses().first(where: { $0.address != "127.0.0.1" }) else { return }
        XCTAssertEqual(AdvertiseScope.matching(host: other.address), .interface(index: if_nametoindex(other.interface)))
    }
}

final class SummaryTests: XCTestCase {
    func testSummaryAndBudgetBoundsOfEveryBundle() throws {
        let v = try loadVectors()
        for m in v.manifests {
            let summary = BundleSummary(try ExpertBundle.open(Vectors.path(m.bundle)))
            XCTAssertEqual(summary.minimumBudget, m.min_budget_bytes, m.bundle)
            XCTAssertEqual(summary.heldBytes, m.expert_bytes_total, m.bundle)
            XCTAssertEqual(summary.expertsTotal, m.layers.reduce(0) { $0 + $1.num_experts })
            XCTAssertEqual(summary.expertsHeld, summary.expertsTotal)
            XCTAssertEqual(summary.shareText, "all experts")
            XCTAssertEqual(summary.bytesPerToken, m.top_k * m.layers.reduce(0) { $0 + $1.record_size })
            let roomy = BudgetBounds(summary: summary, availableBytes: 64 << 30)
            XCTAssertEqual(roomy.maximum, summary.heldBytes)  // more than every expert is never useful
            XCTAssertEqual(roomy.clamp(0), roomy.minimum)
            XCTAssertEqual(roomy.clamp(.max), roomy.maximum)
            let tight = BudgetBounds(summary: summary, availableBytes: 300 << 20)  // 300 MiB free, 256 MiB reserved
            XCTAssertEqual(tight.maximum, 0)
            XCTAssertFalse(tight.isPossible)
            XCTAssertNotNil(tight.problem(available: 300 << 20))
        }
    }

    /// A share holds what `flashmesh shard --count 3 --index 1 --replicas 2` would put there.
    func testShareSummary() throws {
        let v = try loadVectors()
        let m = v.manifests[0]
        let shard = try Shard(count: 3, index: 1, replicas: 2)
        let summary = BundleSummary(try ExpertBundle.open(Vectors.path(m.bundle), shard: shard))
        let held = m.layers.reduce(0) { $0 + $1.experts.filter { shard.holds($0) }.count }
        XCTAssertEqual(summary.expertsHeld, held)
        XCTAssertLessThan(held, summary.expertsTotal)
        XCTAssertEqual(summary.shareText, "share 2 of 3 (2 replicas): --count 3 --index 1")
    }
}

final class StatisticsTests: XCTestCase {
    func testFiguresAsClusterLsComputesThem() {
        var stats = NodeStats()
        stats.requests = 40
        stats.hits = 30
        stats.misses = 10
        stats.bytesRead = 3_000_000_000
        stats.ioSeconds = 1.5
        stats.cacheBytes = 1 << 30
        stats.ramBudgetBytes = 2 << 30
        let before = StatsSample(NodeStats(), latency: (0, 0, 0), at: 10)
        let now = StatsSample(stats, latency: (40, 0.0042, 0.0125), at: 12)
        let shown = StatsDisplay(now, previous: before)
        XCTAssertEqual(shown.requests, "40")
        XCTAssertEqual(shown.requestsPerSecond, "20.0")
        XCTAssertEqual(shown.hitRate, "75.0 %")
        XCTAssertEqual(shown.readGBps, "2.00 GB/s")
        XCTAssertEqual(shown.latency, "4.2 ms (p95 12.5 ms)")
        XCTAssertEqual(shown.cache, "1GiB of 2GiB")
        let idle = StatsDisplay(StatsSample(NodeStats(), latency: (0, 0, 0), at: 1), previous: nil)
        XCTAssertEqual([idle.hitRate, idle.readGBps, idle.latency, idle.requestsPerSecond], ["-", "-", "-", "-"])
    }

    func testLatencyQuantilesOfRecentCalls() {
        let recorder = LatencyRecorder(capacity: 100)
        for i in 1...300 { recorder.record(Double(i)) }  // only 201...300 are kept
        let s = recorder.summary()
        XCTAssertEqual(s.count, 300)
        XCTAssertEqual(s.median, 251, accuracy: 1)
        XCTAssertEqual(s.p95, 295, accuracy: 1)
    }
}

/// A GPU backend is used only after it agrees with the CPU; one that does not is replaced by the CPU.
final class CheckedComputeTests: XCTestCase {
    final class Skewed: ExpertCompute, @unchecked Sendable {
        let cpu = CPUExpertCompute()
        let skew: Float
        init(skew: Float) { self.skew = skew }
        var name: String { "skewed" }
        func prepare(memory: [UnsafeRawBufferPointer]) {}
        func swiglu(_ calls: [ExpertCall], x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
            cpu.swiglu(calls, x: x, y: y)
            let h = calls[0].weights.hidden
            for c in calls { for i in c.firstRow * h..<(c.firstRow + c.rows) * h { y[i] *= 1 + skew } }
        }
    }

    func run(_ compute: any ExpertCompute) -> [Float] {
        let (h, i) = (8, 4)
        let gate = (0..<i * h).map { Float($0 % 7) / 7 - 0.4 }
        let up = (0..<i * h).map { Float($0 % 5) / 5 - 0.3 }
        let down = (0..<h * i).map { Float($0 % 3) / 3 - 0.2 }
        let x = (0..<3 * h).map { Float($0) / 24 - 0.5 }
        var y = [Float](repeating: 0, count: 3 * h)
        gate.withUnsafeBufferPointer { g in
            up.withUnsafeBufferPointer { u in
                down.withUnsafeBufferPointer { d in
                    let w = ExpertWeights(
                        gate: .float32(g.baseAddress!, rows: i, cols: h), up: .float32(u.baseAddress!, rows: i, cols: h),
                        down: .float32(d.baseAddress!, rows: h, cols: i))
                    let calls = [ExpertCall(weights: w, firstRow: 0, rows: 1), ExpertCall(weights: w, firstRow: 1, rows: 2)]
                    y.withUnsafeMutableBufferPointer { compute.swiglu(calls, x: x, y: $0.baseAddress!) }
                }
            }
        }
        return y
    }

    func testAgreeingBackendIsKeptAndDisagreeingOneDropped() {
        let want = run(CPUExpertCompute())
        let close = CheckedExpertCompute(Skewed(skew: 1e-5))
        XCTAssertEqual(zip(run(close), want).map { abs($0 - $1) }.max()!, 0, accuracy: 1e-4)
        XCTAssertNil(close.failure)
        XCTAssertEqual(close.name, "skewed")
        let wrong = CheckedExpertCompute(Skewed(skew: 0.05))
        XCTAssertEqual(run(wrong), want)  // the first call already answers with the CPU's result
        XCTAssertNotNil(wrong.failure)
        XCTAssertEqual(run(wrong), want)
        XCTAssertTrue(wrong.name.hasPrefix("cpu"), wrong.name)
    }
}
