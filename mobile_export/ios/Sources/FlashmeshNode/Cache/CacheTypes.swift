extension ExpertCache {
    public struct Key: Hashable, Sendable, Comparable {
        public let layer: Int
        public let expert: Int

        public init(_ layer: Int, _ expert: Int) {
            self.layer = layer
            self.expert = expert
        }

        public static func < (a: Key, b: Key) -> Bool { (a.layer, a.expert) < (b.layer, b.expert) }
    }

    public struct Stats: Sendable, Equatable {
        public var hits = 0
        public var misses = 0
        public var evictions = 0
        public var bytesRead = 0
        public var ioSeconds = 0.0
        public var computeSeconds = 0.0
        public var peakBytes = 0
        public var prefetched = 0
        public var prefetchUsed = 0
        public var prefetchWasted = 0
        public var prefetchWaitSeconds = 0.0
    }
}
