import Foundation

/// What the app needs from its platform: the transport, the advertiser (none on Linux), the expert
/// compute and the memory it may use. FlashmeshPlatform's `NodePlatform.current` is the real one;
/// tests give their own.
public struct NodePlatform: Sendable {
    public var makeTransport: @Sendable () -> any NodeTransport
    public var makeAdvertiser: @Sendable () -> (any NodeAdvertiser)?
    public var makeCompute: @Sendable () -> any ExpertCompute
    /// Bytes this process may still allocate (iOS: os_proc_available_memory()).
    public var availableMemory: @Sendable () -> Int

    public init(
        makeTransport: @escaping @Sendable () -> any NodeTransport,
        makeAdvertiser: @escaping @Sendable () -> (any NodeAdvertiser)?,
        makeCompute: @escaping @Sendable () -> any ExpertCompute,
        availableMemory: @escaping @Sendable () -> Int
    ) {
        self.makeTransport = makeTransport
        self.makeAdvertiser = makeAdvertiser
        self.makeCompute = makeCompute
        self.availableMemory = availableMemory
    }
}

/// The settings of a serving run, as the app's screen edits them (and saves them between launches).
public struct ServeSettings: Codable, Equatable, Sendable {
    public var token = ""
    public var name: String
    public var shareCount = 1
    public var shareIndex = 0
    public var replicas = 1
    public var budgetBytes = 0  // 0: the largest the device allows
    public var host = "0.0.0.0"  // every interface: a phone serves its Wi-Fi network
    public var port = 0  // any free port; the advertisement carries it
    /// The node's mutual-TLS identity directory (a join file installed by NodeController.importJoinFile);
    /// nil: plaintext with the token only.
    public var tls: String?

    public init(name: String) {
        self.name = name
    }

    public func shard() throws(UserError) -> Shard? {
        shareCount > 1 ? try Shard(count: shareCount, index: shareIndex, replicas: replicas) : nil
    }
}

/// What a serving node shows: who it is, where coordinators reach it, what computes.
public struct ServingInfo: Equatable, Sendable {
    public let nodeId: String
    public let port: Int
    public let expertsHeld: Int
    public let expertsTotal: Int
    public let budgetBytes: Int
    public let compute: String
    /// "mutual TLS as NAME, certificate valid until DATE", or "plaintext (cluster token only)".
    public let security: String
    /// The DNS-SD instance advertised, or why there is none.
    public let discovery: String
    /// "ADDR:PORT" for `flashmesh run --cluster --node ADDR:PORT` where multicast does not reach.
    public let addresses: [String]
}

/// One serving run: the service, its transport and advertisement, and its call latency.
final class RunningNode: @unchecked Sendable {
    let service: NodeService
    let transport: any NodeTransport
    let advertiser: (any NodeAdvertiser)?
    let latency = LatencyRecorder()
    private(set) var info: ServingInfo!

    private init(service: NodeService, transport: any NodeTransport, advertiser: (any NodeAdvertiser)?) {
        self.service = service
        self.transport = transport
        self.advertiser = advertiser
    }

    /// Opens the share, allocates the cache, listens and advertises (seconds: the slabs are written).
    static func start(path: String, settings: ServeSettings, budget: Int, platform: NodePlatform)
        throws(UserError) -> RunningNode
    {
        let tls = try settings.tls.map { (dir: String) throws(UserError) -> TLSIdentity in
            let identity = try TLSIdentity.load(dir, name: settings.name)
            guard identity.name == settings.name else {
                throw UserError(
                    "the node name is \(settings.name) but the certificate is node \(identity.name)'s; set the name to "
                        + "\(identity.name), or join with `flashmesh cluster add-node \(settings.name)`'s file")
            }
            return identity
        }
        let bundle = try ExpertBundle.open(path, shard: try settings.shard())
        let options = NodeService.Options(ramBudget: budget, token: settings.token, name: settings.name)
        let service = try NodeService(bundle: bundle, options: options, compute: platform.makeCompute())
        let node = RunningNode(service: service, transport: platform.makeTransport(), advertiser: platform.makeAdvertiser())
        let rpc = NodeRPC(node: service)
        let latency = node.latency
        let port: Int
        do {
            port = try node.transport.start(host: settings.host, port: settings.port, maxMessageBytes: options.maxMessageBytes, tls: tls) {
                call in
                let start = monotonicSeconds()
                let reply = rpc.handle(call)
                if call.method == "/\(NodeRPC.service)/Compute" { latency.record(monotonicSeconds() - start) }
                return reply
            }
        } catch {
            service.close()
            throw error
        }
        let info = service.info()
        let advertisement = Advertisement(name: settings.name, nodeId: service.nodeId, fingerprint: info.fingerprint, port: port)
        var discovery = "not advertised: this platform has no DNS-SD; give the coordinator --node ADDR:PORT"
        if let advertiser = node.advertiser {
            do {
                guard let scope = AdvertiseScope.matching(host: settings.host) else {
                    throw UserError("no interface holds \(settings.host)")
                }
                try advertiser.advertise(advertisement, scope: scope)
                discovery = "advertised as \(advertisement.instanceName) (\(Advertisement.serviceType))"
            } catch {
                discovery = "not advertised (\(error)); give the coordinator --node ADDR:PORT"
                Log.warning(discovery)
            }
        }
        let addresses = settings.host == "0.0.0.0"
            ? NetworkInterfaces.ipv4Addresses().map(\.address).filter { $0 != "127.0.0.1" } : [settings.host]
        node.info = ServingInfo(
            nodeId: service.nodeId, port: port, expertsHeld: info.layers.reduce(0) { $0 + $1.experts.count },
            expertsTotal: info.layers.reduce(0) { $0 + Int($1.numExperts) }, budgetBytes: budget,
            compute: service.computeName,
            security: tls.map { "mutual TLS as \($0.name), certificate valid until \(CivilDate.format($0.notAfter, time: false))" }
                ?? "plaintext (cluster token only)",
            discovery: discovery, addresses: addresses.map { "\($0):\(port)" })
        return node
    }

    /// Withdraws the advertisement, lets calls in flight finish (1 s), closes the record files.
    func stop() {
        advertiser?.withdraw()
        transport.stop(grace: 1.0)
        service.close()
    }
}

/// Cluster tokens the node makes up when none is given (24 URL-safe characters).
public enum ClusterToken {
    public static func generate() -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        var generator = SystemRandomNumberGenerator()
        return String((0..<24).map { _ in alphabet[Int(generator.next() % UInt64(alphabet.count))] })
    }
}
