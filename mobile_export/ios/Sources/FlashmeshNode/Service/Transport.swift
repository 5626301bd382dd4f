/// One unary call as a transport delivers it: method path, the token metadata entry, request bytes.
public struct RPCCall: Sendable {
    public let method: String
    public let token: String?
    public let request: [UInt8]

    public init(method: String, token: String?, request: [UInt8]) {
        self.method = method
        self.token = token
        self.request = request
    }
}

/// What a transport sends back: the reply message, or a status with a message and trailing metadata.
public enum RPCReply: Sendable {
    case message([UInt8])
    case failure(StatusCode, String, trailer: (key: String, value: String)?)
}

/// A server for unary RPCs (gRPC here: FlashmeshGRPC's `GRPCCoreTransport`). Calls may arrive on any
/// thread and concurrently; `handler` answers each.
public protocol NodeTransport: AnyObject, Sendable {
    /// Starts listening on host:port (0 = any free port); returns the port. A transport serves once.
    /// With `tls`, only mutual TLS: its certificate, and client certificates required from its CA.
    func start(
        host: String, port: Int, maxMessageBytes: Int, tls: TLSIdentity?, handler: @escaping @Sendable (RPCCall) -> RPCReply
    ) throws(UserError) -> Int

    /// Stops taking calls; calls in flight may finish for `grace` seconds. Returns when all are done.
    func stop(grace: Double)
}
