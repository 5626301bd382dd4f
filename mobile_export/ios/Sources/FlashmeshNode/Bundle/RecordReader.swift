import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Reads whole expert records: one 16 KiB-aligned buffer per record, several `pread`s in flight from
/// a pool of reader threads, around the OS page cache (O_DIRECT on Linux, F_NOCACHE on Darwin) unless
/// `pageCache` lets it help, and each record's xxh3 checked against the manifest. Never mmap: page
/// faults would serialize reads at queue depth 1.
public final class RecordReader: @unchecked Sendable {
    public static let recordAlignment = 16 * 1024

    public struct Stats: Sendable {
        public var records = 0
        public var bytes = 0
        public var seconds = 0.0  // wall time callers spent waiting for reads
    }

    public let queueDepth: Int
    public let verify: Bool
    /// Whether reads really go around the page cache (a filesystem may refuse O_DIRECT).
    public let bypassingCache: Bool
    private let bundlePath: String
    private let chunkBytes: Int
    private let descriptors: [Int: Int32]
    private let recordSizes: [Int: Int]
    private let pool: WorkerPool
    private let buffers: BufferPool
    private let counters = Locked(Stats())

    public init(
        bundle: ExpertBundle, pageCache: Bool = false, verify: Bool = true, queueDepth: Int = 8,
        chunkBytes: Int = 8 * 1024 * 1024
    ) throws(UserError) {
        self.queueDepth = queueDepth
        self.verify = verify
        self.bundlePath = bundle.path
        self.chunkBytes = max(Self.recordAlignment, chunkBytes / Self.recordAlignment * Self.recordAlignment)
        var descriptors: [Int: Int32] = [:]
        var bypassing = false
        for layer in bundle.layers {
            let path = bundle.path + "/" + layer.file
            let opened = FlashFile.open(path, bypassingCache: !pageCache)
            guard let fd = opened.fd else {
                descriptors.values.forEach(FlashFile.close)
                throw UserError("cannot open \(path) (\(systemMessage(opened.errno))); re-copy or re-export the bundle")
            }
            bypassing = bypassing || opened.bypassing
            descriptors[layer.layer] = fd
        }
        self.descriptors = descriptors
        recordSizes = Dictionary(uniqueKeysWithValues: bundle.layers.map { ($0.layer, $0.recordSize) })
        self.bypassingCache = bypassing
        pool = WorkerPool(workers: queueDepth, name: "flashmesh-read")
        buffers = BufferPool(keep: 2 * queueDepth)
    }

    public var stats: Stats { counters.withLock { $0 } }

    /// Starts reading the records of `experts` (held by `layer`); does not wait.
    public func submit(_ layer: LayerPlan, _ experts: [Int]) -> PendingRead {
        let pending = PendingRead(layer: layer.layer, experts: experts, reader: self)
        guard let fd = descriptors[layer.layer] else {
            for e in experts { pending.fail(e, RecordError(layer: layer.layer, expert: e, reason: .unreadable(errno: EBADF, file: layer.file))) }
            return pending
        }
        let size = layer.recordSize
        let file = bundlePath + "/" + layer.file
        for expert in experts {
            guard let base = layer.recordOffset(expert), let expected = layer.recordChecksum(expert) else {
                pending.fail(expert, RecordError(layer: layer.layer, expert: expert, reason: .shortRead(got: 0, expected: size)))
                continue
            }
            let buffer = buffers.take(size)
            let chunks = stride(from: 0, to: size, by: chunkBytes).map { ($0, min(chunkBytes, size - $0)) }
            let record = RecordProgress(chunks: chunks.count)
            for (offset, length) in chunks {
                pending.enter()
                pool.submit { [self] in
                    let got = FlashFile.readFully(fd, into: buffer.pointer + offset, count: length, at: base + offset)
                    if let total = record.finish(got) {
                        pending.complete(expert, check(buffer, got: total, size: size, expected: expected, layer: layer.layer, expert: expert, file: file))
                    }
                    pending.leave()
                }
            }
        }
        return pending
    }

    /// Fetches the records of `experts` in parallel and waits for them.
    public func read(_ layer: LayerPlan, _ experts: [Int]) throws(RecordError) -> [Int: AlignedBuffer] {
        try submit(layer, experts).result()
    }

    private func check(
        _ buffer: AlignedBuffer, got: Int, size: Int, expected: String, layer: Int, expert: Int, file: String
    ) -> Result<AlignedBuffer, RecordError> {
        if got < 0 {
            recycle(buffer)
            return .failure(RecordError(layer: layer, expert: expert, reason: .unreadable(errno: Int32(-got), file: file)))
        }
        if got != size {
            recycle(buffer)
            return .failure(RecordError(layer: layer, expert: expert, reason: .shortRead(got: got, expected: size)))
        }
        if verify && Checksum.xxh3Hex(buffer.bytes(size)) != expected {
            recycle(buffer)
            return .failure(RecordError(layer: layer, expert: expert, reason: .checksumMismatch(file: file)))
        }
        return .success(buffer)
    }

    func recordSize(_ layer: Int) -> Int { recordSizes[layer] ?? 0 }

    func account(records: Int, bytes: Int, seconds: Double) {
        counters.withLock {
            $0.records += records
            $0.bytes += bytes
            $0.seconds += seconds
        }
    }

    /// Gives a record buffer back for later reads once its contents are no longer needed.
    public func recycle(_ buffer: AlignedBuffer) {
        buffers.give(buffer)
    }

    /// Finishes reads in flight and closes the files.
    public func close() {
        pool.shutdown()
        descriptors.values.forEach(FlashFile.close)
    }
}

/// Counts a record's chunks in; the last one to finish learns the total bytes read (or -errno).
private final class RecordProgress: @unchecked Sendable {
    private let lock = NSLock()
    private var remaining: Int
    private var total = 0

    init(chunks: Int) {
        remaining = chunks
    }

    func finish(_ got: Int) -> Int? {
        lock.lock()
        defer { lock.unlock() }
        total = (total < 0 || got < 0) ? min(total, got) : total + got
        remaining -= 1
        return remaining == 0 ? total : nil
    }
}
