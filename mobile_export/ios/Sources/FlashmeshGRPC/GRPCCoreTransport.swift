// The iOS app compiles this file and the shim itself, with gRPC's C core from grpc's Swift package
// (App/project.yml); there the shim comes through the app's bridging header, not a module.
#if canImport(CGRPCShim)
import CGRPCShim
#endif
import FlashmeshNode
import Foundation

/// The node's gRPC server: gRPC's C core through the CGRPCShim target, in plaintext or mutual TLS (the C
/// core's SSL server credentials, client certificates required and verified). One thread drives
/// the completion queue and hands each call, request received, to a pool of handler threads.
public final class GRPCCoreTransport: NodeTransport, @unchecked Sendable {
    private let handlers: Int
    private let state = Locked<(server: OpaquePointer?, loop: Thread?, done: DispatchSemaphore?)>((nil, nil, nil))

    /// `handlers`: calls served at once (the Python node's gRPC server has 8 threads).
    public init(handlers: Int = 8) {
        self.handlers = handlers
    }

    public func start(
        host: String, port: Int, maxMessageBytes: Int, tls: TLSIdentity?, handler: @escaping @Sendable (RPCCall) -> RPCReply
    ) throws(UserError) -> Int {
        let address = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        var bound: Int32 = 0
        var error = [CChar](repeating: 0, count: 256)
        // gRPC's own limit a little above the node's validated one: an oversized request gets the
        // node's INVALID_ARGUMENT, one far above it gRPC's RESOURCE_EXHAUSTED (node/server.py).
        let limit = Int32(clamping: maxMessageBytes + 1024 * 1024)
        let started = withTLS(tls) { fm_server_start(address, limit, $0, &bound, &error, error.count) }
        guard let server = started else {
            throw UserError("cannot listen on \(host) port \(port): \(String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))")
        }
        let pool = WorkerPool(workers: handlers, name: "flashmesh-grpc")
        let done = DispatchSemaphore(value: 0)
        let handle = CallHandle(pointer: server)
        let loop = Thread {
            while let call = fm_server_next_call(handle.pointer) {
                let call = CallHandle(pointer: call)
                pool.submit { GRPCCoreTransport.serve(call.pointer, handler) }
            }
            pool.shutdown()
            done.signal()
        }
        loop.name = "flashmesh-grpc-cq"
        state.withLock { $0 = (server, loop, done) }
        loop.start()
        return Int(bound)
    }

    public func stop(grace: Double) {
        let (server, _, done) = state.withLock { $0 }
        guard let server, let done else { return }
        fm_server_shutdown(server, grace)
        done.wait()
        fm_server_destroy(server)
        state.withLock { $0 = (nil, nil, nil) }
    }

    private static func serve(_ call: OpaquePointer, _ handler: @Sendable (RPCCall) -> RPCReply) {
        var length = 0
        let request = fm_call_request(call, &length).map { [UInt8](UnsafeBufferPointer(start: $0, count: length)) } ?? []
        var tokenLength = 0
        let token = fm_call_metadata(call, NodeMetadata.token, &tokenLength).map {
            String(decoding: UnsafeBufferPointer(start: $0, count: tokenLength), as: UTF8.self)
        }
        let method = String(cString: fm_call_method(call))
        switch handler(RPCCall(method: method, token: token, request: request)) {
        case let .message(bytes):
            _ = bytes.withUnsafeBufferPointer { fm_call_finish(call, 0, $0.baseAddress, $0.count, nil, nil, nil) }
        case let .failure(status, message, trailer):
            _ = fm_call_finish(call, status.rawValue, nil, 0, message, trailer?.key, trailer?.value)
        }
    }
}

/// Calls `body` with the shim's view of `tls` (NUL-terminated PEM text; gRPC copies it), or NULL.
private func withTLS<T>(_ tls: TLSIdentity?, _ body: (UnsafePointer<fm_tls>?) -> T) -> T {
    guard let tls else { return body(nil) }
    let (ca, cert, key) = (tls.caPEM + [0], tls.certPEM + [0], tls.keyPEM + [0])
    return ca.withUnsafeBufferPointer { ca in
        cert.withUnsafeBufferPointer { cert in
            key.withUnsafeBufferPointer { key in
                let cString = { (b: UnsafeBufferPointer<UInt8>) in UnsafeRawPointer(b.baseAddress!).assumingMemoryBound(to: CChar.self) }
                return withUnsafePointer(to: fm_tls(ca_pem: cString(ca), cert_pem: cString(cert), key_pem: cString(key))) { body($0) }
            }
        }
    }
}

/// A C pointer handed between threads; the shim's protocol says who may use it when.
private struct CallHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}
