import Foundation

/// Durations of the node's Compute calls as the transport handed them over (receipt to reply), the
/// most recent `capacity` kept: the RPC latency the app shows.
public final class LatencyRecorder: @unchecked Sendable {
    private let capacity: Int
    private let samples = Locked<(values: [Double], next: Int, count: Int)>(([], 0, 0))

    public init(capacity: Int = 256) {
        self.capacity = capacity
    }

    public func record(_ seconds: Double) {
        samples.withLock { s in
            if s.values.count < capacity { s.values.append(seconds) } else { s.values[s.next] = seconds }
            s.next = (s.next + 1) % capacity
            s.count += 1
        }
    }

    /// (calls recorded in all, median and 95th percentile of the recent ones in seconds).
    public func summary() -> (count: Int, median: Double, p95: Double) {
        let (values, count) = samples.withLock { ($0.values, $0.count) }
        let sorted = values.sorted()
        func quantile(_ q: Double) -> Double {
            sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int((q * Double(sorted.count - 1)).rounded()))]
        }
        return (count, quantile(0.5), quantile(0.95))
    }
}

/// One reading of the node's counters (the Stats RPC's NodeStats) and its call latency.
public struct StatsSample: Equatable, Sendable {
    public var seconds: Double  // monotonic time of the reading
    public var requests = 0, hits = 0, misses = 0, bytesRead = 0, rejected = 0
    public var ioSeconds = 0.0
    public var cacheBytes = 0, budgetBytes = 0
    public var latencyMedian = 0.0, latencyP95 = 0.0

    public init(seconds: Double) {
        self.seconds = seconds
    }

    public init(_ stats: NodeStats, latency: (count: Int, median: Double, p95: Double), at seconds: Double) {
        self.seconds = seconds
        requests = Int(stats.requests)
        hits = Int(stats.hits)
        misses = Int(stats.misses)
        bytesRead = Int(stats.bytesRead)
        rejected = Int(stats.rejected)
        ioSeconds = stats.ioSeconds
        cacheBytes = Int(stats.cacheBytes)
        budgetBytes = Int(stats.ramBudgetBytes)
        latencyMedian = latency.median
        latencyP95 = latency.p95
    }
}

/// The live figures on the serving screen, as text: totals since start and rates since the previous
/// reading. Hit rate and read GB/s are computed as `flashmesh cluster ls` computes them
/// (node/cache_stats.py: hits / (hits + misses), bytes read / seconds spent reading).
public struct StatsDisplay: Equatable, Sendable {
    public let requests: String
    public let requestsPerSecond: String
    public let hitRate: String
    public let readGBps: String
    public let bytesRead: String
    public let latency: String
    public let cache: String
    public let rejected: String

    public init(_ now: StatsSample, previous: StatsSample?) {
        let before = previous ?? StatsSample(seconds: now.seconds)
        let elapsed = now.seconds - before.seconds
        requests = "\(now.requests)"
        requestsPerSecond = elapsed > 0 ? StatsDisplay.fixed(Double(now.requests - before.requests) / elapsed, 1) : "-"
        let lookups = now.hits + now.misses
        hitRate = lookups > 0 ? StatsDisplay.fixed(100 * Double(now.hits) / Double(lookups), 1) + " %" : "-"
        readGBps = now.ioSeconds > 0 ? StatsDisplay.fixed(Double(now.bytesRead) / now.ioSeconds / 1e9, 2) + " GB/s" : "-"
        bytesRead = ByteSize.format(now.bytesRead)
        latency = now.requests > 0
            ? "\(StatsDisplay.fixed(now.latencyMedian * 1e3, 1)) ms (p95 \(StatsDisplay.fixed(now.latencyP95 * 1e3, 1)) ms)" : "-"
        cache = "\(ByteSize.format(now.cacheBytes)) of \(ByteSize.format(now.budgetBytes))"
        rejected = "\(now.rejected)"
    }

    static func fixed(_ value: Double, _ digits: Int) -> String {
        String(format: "%.\(digits)f", value)
    }
}
