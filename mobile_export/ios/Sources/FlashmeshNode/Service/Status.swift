/// gRPC status codes (grpc/status.h), the ones a node answers with and the rest for completeness.
public enum StatusCode: Int32, Sendable {
    case ok = 0, cancelled, unknown, invalidArgument, deadlineExceeded, notFound, alreadyExists
    case permissionDenied, resourceExhausted, failedPrecondition, aborted, outOfRange, unimplemented
    case `internal`, unavailable, dataLoss, unauthenticated
}

/// The protocol's metadata keys (protos/__init__.py).
public enum NodeMetadata {
    public static let token = "x-flashmesh-token"
    /// The DATA_LOSS trailer: "layer:expert,..." of the damaged records, read by the coordinator's failover.
    public static let lostRecords = "x-flashmesh-lost-records"
    public static let defaultMaxMessageBytes = 256 * 1024 * 1024
}

/// A request the node refuses or cannot serve: the status to answer with, a one-line message, and the
/// (layer, expert) records found damaged (DATA_LOSS), so a coordinator can use a replica.
public struct RequestError: Error, CustomStringConvertible, Sendable {
    public let status: StatusCode
    public let message: String
    public let records: [(layer: Int, expert: Int)]

    public init(_ status: StatusCode, _ message: String, records: [(layer: Int, expert: Int)] = []) {
        self.status = status
        self.message = message
        self.records = records
    }

    public var description: String { message }

    /// protos/codec.py `format_records`.
    public var trailer: String? {
        records.isEmpty ? nil : records.map { "\($0.layer):\($0.expert)" }.joined(separator: ",")
    }
}
