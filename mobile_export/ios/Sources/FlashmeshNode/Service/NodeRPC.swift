/// The protocol's methods over a `NodeService` (node/server.py, transport-free): the token is checked
/// before the request is parsed, bytes that are not a valid message are INVALID_ARGUMENT, and a
/// damaged record is DATA_LOSS with the records in the `x-flashmesh-lost-records` trailer.
public struct NodeRPC: Sendable {
    public static let service = "flashmesh.v1.Node"
    public let node: NodeService

    public init(node: NodeService) {
        self.node = node
    }

    public func handle(_ call: RPCCall) -> RPCReply {
        let prefix = "/\(NodeRPC.service)/"
        let method = call.method.hasPrefix(prefix) ? String(call.method.dropFirst(prefix.count)) : ""
        guard ["Info", "Compute", "Prefetch", "Stats", "Health"].contains(method) else {
            return .failure(.unimplemented, "Method not found!", trailer: nil)
        }
        do {
            try node.checkToken(call.token)
            switch method {
            case "Info":
                _ = try parse(InfoRequest.self, call.request)
                return .message(node.info().serialized())
            case "Compute":
                let request = try parse(ComputeRequest.self, call.request)
                return .message(try node.compute(request, size: call.request.count).serialized())
            case "Prefetch":
                return .message(try node.prefetch(try parse(PrefetchRequest.self, call.request)).serialized())
            case "Stats":
                _ = try parse(StatsRequest.self, call.request)
                return .message(node.stats().serialized())
            default:
                _ = try parse(HealthRequest.self, call.request)
                return .message(node.health().serialized())
            }
        } catch {
            if error.status != .unauthenticated && error.status != .invalidArgument {
                Log.warning("refused request: \(error.message)")
            }
            return .failure(error.status, error.message, trailer: error.trailer.map { (NodeMetadata.lostRecords, $0) })
        }
    }

    private func parse<M: ProtoMessage>(_ type: M.Type, _ bytes: [UInt8]) throws(RequestError) -> M {
        do {
            return try M(serialized: bytes)
        } catch {
            throw node.invalid("the request is not a valid \(M.self) message (\(error))")
        }
    }
}
