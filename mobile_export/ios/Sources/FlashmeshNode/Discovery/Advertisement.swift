/// What a node advertises by DNS-SD as `_flashmesh._tcp` (node/advertise.py): the instance label and
/// the TXT record (id, name, fp, proto, port; never the token), so `flashmesh run --cluster` finds it.
public struct Advertisement: Equatable, Sendable {
    public static let serviceType = "_flashmesh._tcp"  // protos/__init__.py SERVICE_TYPE without ".local."
    public let name: String
    public let nodeId: String
    public let fingerprint: String
    public let port: Int

    public init(name: String, nodeId: String, fingerprint: String, port: Int) {
        self.name = name
        self.nodeId = nodeId
        self.fingerprint = fingerprint
        self.port = port
    }

    /// The service instance label (node/advertise.py `instance_name`): the name made DNS-safe and cut to
    /// 40 characters, then the first 8 characters of the node id.
    public var instanceName: String {
        let safe = String(String.UnicodeScalarView(name.unicodeScalars.map { isAlphanumeric($0) || $0 == "-" ? $0 : "-" }.prefix(40)))
        return "\(safe.isEmpty ? "node" : safe)-\(nodeId.prefix(8))"
    }

    /// The TXT record's entries, in the order Python writes them.
    public var txtEntries: [(key: String, value: String)] {
        [
            ("id", nodeId), ("name", name), ("fp", fingerprint), ("proto", String(BundleManifest.protocolVersion)),
            ("port", String(port)),
        ]
    }

    /// The TXT record's rdata (length-prefixed "key=value" strings), as zeroconf and DNSServiceRegister
    /// take it. A value too long for one string (255 bytes) is a programming error: ours are short.
    public var txtRecord: [UInt8] {
        txtEntries.flatMap { entry -> [UInt8] in
            let bytes = Array("\(entry.key)=\(entry.value)".utf8).prefix(255)
            return [UInt8(bytes.count)] + bytes
        }
    }

    /// Python's str.isalnum for one code point: a letter (Lu, Ll, Lt, Lm, Lo) or a numeric character.
    private func isAlphanumeric(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return scalar.properties.numericType != nil
        }
    }
}

/// Where an advertisement is visible: this machine only (a node on 127.0.0.1, as the Python node
/// advertises by default), every interface, or the interface that holds one address.
public enum AdvertiseScope: Equatable, Sendable {
    case localOnly
    case everyInterface
    case interface(index: UInt32)

    /// The scope that matches the address a node listens on; nil: no interface holds that address.
    public static func matching(host: String) -> AdvertiseScope? {
        if host == "0.0.0.0" || host == "::" || host.isEmpty { return .everyInterface }
        if host == "127.0.0.1" || host == "::1" || host == "localhost" { return .localOnly }
        return NetworkInterfaces.index(holding: host).map { .interface(index: $0) }
    }
}

/// Advertises a node by DNS-SD (FlashmeshPlatform's Bonjour advertiser on Apple platforms). There
/// is none on Linux: its mDNS daemon would multicast on every interface; coordinators use --node.
public protocol NodeAdvertiser: Sendable {
    /// Registers the service until `withdraw`; a problem the user can fix is one line.
    func advertise(_ advertisement: Advertisement, scope: AdvertiseScope) throws(UserError)
    func withdraw()
}
