import FlashmeshNode
import Foundation

/// Token, name, TLS identity and listening address as `flashmesh node serve` takes them
/// (node/cluster_config.py): the flag, else the environment ($FLASHMESH_TOKEN, $FLASHMESH_TLS), else
/// the join file (--join) or the config file of `flashmesh cluster join`, else the built-in default
/// (127.0.0.1, plaintext, a token made up).
struct ClusterSettings {
    var token: String?
    var name: String
    var tls: TLSIdentity?
    var host: String

    static func resolve(_ args: Arguments, environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(UserError) -> ClusterSettings
    {
        func env(_ key: String) -> String? { environment[key].flatMap { $0.isEmpty ? nil : $0 } }
        let join = try args.join.map { (path: String) throws(UserError) in try JoinFile.read(path) }
        let directory = ClusterConfig.directory(environment: environment)
        var config = join?.config
        if join == nil { config = try ClusterConfig.load(directory: directory) }
        let name = args.name ?? config?.name
        var tls = join?.identity
        if tls == nil, let path = args.tls ?? env("FLASHMESH_TLS") ?? config?.tls.map({ $0.hasPrefix("/") ? $0 : "\(directory)/\($0)" }) {
            tls = try TLSIdentity.load(path, name: name ?? ProcessInfo.processInfo.hostName)
        }
        try tls?.checkName(name)
        let source = join?.path ?? "\(directory)/\(ClusterConfig.fileName)"
        let host = args.host ?? ""
        return ClusterSettings(
            token: args.token ?? env("FLASHMESH_TOKEN") ?? config?.token,
            name: name ?? tls?.name ?? ProcessInfo.processInfo.hostName,
            tls: tls,
            host: host.isEmpty ? try defaultHost(config, source: source) : host)
    }

    /// Where to listen without --host: every interface for a config's "auto" (the Python node listens on
    /// each up interface), its one address, else this machine only.
    private static func defaultHost(_ config: ClusterConfig?, source: String) throws(UserError) -> String {
        guard let interfaces = config?.interfaces else { return "127.0.0.1" }
        if interfaces == ["auto"] { return "0.0.0.0" }
        guard interfaces.count == 1 else {
            throw UserError("\(source) lists \(interfaces.count) interfaces; flashmesh-node listens on one: give --host ADDR")
        }
        return interfaces[0]
    }
}
