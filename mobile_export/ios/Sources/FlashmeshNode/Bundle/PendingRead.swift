import Foundation

/// Record reads in flight for one layer; `result()` waits for all of them.
public final class PendingRead: @unchecked Sendable {
    public let layer: Int
    public let experts: [Int]
    private let group = DispatchGroup()
    private let outcomes = Locked<[Int: Result<AlignedBuffer, RecordError>]>([:])
    private let started = monotonicSeconds()
    private let reader: RecordReader

    init(layer: Int, experts: [Int], reader: RecordReader) {
        self.layer = layer
        self.experts = experts
        self.reader = reader
    }

    func enter() { group.enter() }
    func leave() { group.leave() }

    func complete(_ expert: Int, _ outcome: Result<AlignedBuffer, RecordError>) {
        outcomes.withLock { $0[expert] = outcome }
    }

    func fail(_ expert: Int, _ error: RecordError) {
        complete(expert, .failure(error))
    }

    /// Waits; returns expert -> its record, or throws the first failure (in `experts` order) once
    /// every read has finished. Buffers of a failed batch go back to the reader.
    public func result() throws(RecordError) -> [Int: AlignedBuffer] {
        group.wait()
        let done = outcomes.withLock { $0 }
        var records: [Int: AlignedBuffer] = [:]
        var firstError: RecordError?
        for expert in experts {
            switch done[expert] {
            case let .success(buffer)?: records[expert] = buffer
            case let .failure(error)?: firstError = firstError ?? error
            case nil: firstError = firstError ?? RecordError(layer: layer, expert: expert, reason: .shortRead(got: 0, expected: 0))
            }
        }
        let size = reader.recordSize(layer)
        reader.account(records: records.count, bytes: records.count * size, seconds: monotonicSeconds() - started)
        if let firstError {
            records.values.forEach(reader.recycle)
            throw firstError
        }
        return records
    }
}
