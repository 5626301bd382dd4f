import Foundation

/// A node's mutual-TLS identity as `flashmesh cluster init` / `add-node` write it (node/tls.py): the
/// cluster CA's certificate, this node's certificate and its private key. Loading checks what a user
/// can get wrong, with node/tls.py's one-line messages: a missing file, a key of another certificate,
/// a certificate of another cluster's CA, an expired one, a coordinator's certificate where a node's
/// belongs. The transport serves only mutual TLS with it (client certificates from the CA required).
public struct TLSIdentity: Sendable, Equatable {
    public static let caFile = "ca.crt", certFile = "tls.crt", keyFile = "tls.key"
    static let nodesDir = "nodes", coordinatorDir = "coordinator"
    static let reissue = "reissue it where the cluster CA is: `flashmesh cluster add-node CLUSTER_DIR NAME --force`"

    /// Where it was read from (an identity directory, or `FILE:identity` inside a join file).
    public let path: String
    /// The certificate's common name: the node's name, which coordinators check.
    public let name: String
    public let caPEM: [UInt8]
    public let certPEM: [UInt8]
    public let keyPEM: [UInt8]
    public let notAfter: Date

    /// "mutual TLS: certificate DIR valid until 2028-03-05" (the Python node's second start line).
    public var summary: String { "mutual TLS: certificate \(path) valid until \(CivilDate.format(notAfter, time: false))" }

    /// Reads and checks the identity directory `path` names: itself when it holds tls.crt, else in a
    /// cluster directory `nodes/NAME` (`name`: the node's name).
    public static func load(_ path: String, name: String?, now: Date = Date()) throws(UserError) -> TLSIdentity {
        let directory = try resolve(path, name: name)
        func read(_ file: String) throws(UserError) -> [UInt8] {
            let full = "\(directory)/\(file)"
            guard let data = FileManager.default.contents(atPath: full) else {
                if FileManager.default.fileExists(atPath: full) {
                    throw UserError("\(full) cannot be read; check its permissions")
                }
                throw UserError(
                    "\(full) is missing; copy the whole directory written by `flashmesh cluster init` / `add-node` "
                        + "(\(caFile), \(certFile), \(keyFile))")
            }
            return [UInt8](data)
        }
        let identity = try check(
            ca: try read(caFile), cert: try read(certFile), key: try read(keyFile), at: directory, now: now)
        if let mode = try? FileManager.default.attributesOfItem(atPath: "\(directory)/\(keyFile)")[.posixPermissions] as? Int,
            mode & 0o077 != 0
        {
            Log.warning("\(directory)/\(keyFile) is readable by other users; chmod 600 it")
        }
        return identity
    }

    static func resolve(_ path: String, name: String?) throws(UserError) -> String {
        let path = (path as NSString).expandingTildeInPath
        let files = FileManager.default
        var isDirectory: ObjCBool = false
        guard files.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw UserError(
                "\(path) does not exist; create certificates with `flashmesh cluster init CLUSTER_DIR` and copy "
                    + "CLUSTER_DIR/\(nodesDir)/NAME to each node (CLUSTER_DIR/\(coordinatorDir) to the coordinator)")
        }
        if files.fileExists(atPath: "\(path)/\(certFile)") { return path }
        if files.fileExists(atPath: "\(path)/\(nodesDir)", isDirectory: &isDirectory), isDirectory.boolValue {
            guard let name else {
                throw UserError("\(path) is a cluster directory; pass --name NAME or --tls \(path)/\(nodesDir)/NAME")
            }
            guard files.fileExists(atPath: "\(path)/\(nodesDir)/\(name)") else {
                throw UserError("\(path) holds no certificate for node '\(name)'; run `flashmesh cluster add-node \(path) \(name)`")
            }
            return "\(path)/\(nodesDir)/\(name)"
        }
        return path  // reading it names the missing file
    }

    /// Checks a node identity from its three files' bytes (`directory`: where they are, for messages).
    public static func check(ca caPEM: [UInt8], cert certPEM: [UInt8], key keyPEM: [UInt8], at directory: String, now: Date = Date())
        throws(UserError) -> TLSIdentity
    {
        let (caPath, certPath, keyPath) = ("\(directory)/\(caFile)", "\(directory)/\(certFile)", "\(directory)/\(keyFile)")
        func certificate(_ pem: [UInt8], _ path: String) throws(UserError) -> Certificate {
            guard let block = PEM.decode(pem), block.label == "CERTIFICATE", let cert = try? Certificate(der: block.der) else {
                throw UserError("\(path) is not a PEM certificate; \(reissue)")
            }
            return cert
        }
        let ca = try certificate(caPEM, caPath)
        let cert = try certificate(certPEM, certPath)
        guard let block = PEM.decode(keyPEM), block.label.hasSuffix("PRIVATE KEY"), !block.label.contains("ENCRYPTED"),
            let keyPublic = try? PrivateKey.publicKey(pem: block.label, der: block.der)
        else {
            throw UserError("\(keyPath) is not an unencrypted PEM private key; \(reissue)")
        }
        guard keyPublic.elementsEqual(cert.publicKey) else {
            throw UserError("\(keyPath) is not the key of \(certPath); copy both from the same directory")
        }
        guard cert.names(issuer: ca) else {
            throw UserError("\(certPath) was not issued by the cluster CA in \(caPath); \(reissue)")
        }
        try checkDates(caPath, ca, now, fix: "make a new CA and certificates: `flashmesh cluster init --force`")
        try checkDates(certPath, cert, now, fix: reissue)
        guard cert.role == .node else {
            throw UserError(
                "\(certPath) is a \(cert.role?.rawValue ?? "foreign") certificate, not a node's; use CLUSTER_DIR/\(nodesDir)/NAME")
        }
        return TLSIdentity(path: directory, name: cert.commonName, caPEM: caPEM, certPEM: certPEM, keyPEM: keyPEM, notAfter: cert.notAfter)
    }

    private static func checkDates(_ path: String, _ cert: Certificate, _ now: Date, fix: String) throws(UserError) {
        if now > cert.notAfter { throw UserError("\(path) expired on \(CivilDate.format(cert.notAfter)) UTC; \(fix)") }
        if now < cert.notBefore {
            throw UserError("\(path) is valid only from \(CivilDate.format(cert.notBefore)) UTC; check this machine's clock")
        }
    }

    /// Refuses a node name other than the certificate's (coordinators check the name against it).
    public func checkName(_ given: String?, flag: String = "--name") throws(UserError) {
        guard let given, given != name else { return }
        throw UserError(
            "\(flag) \(given) but \(path)/\(TLSIdentity.certFile) is node \(name)'s certificate; "
                + "drop \(flag), or issue one with `flashmesh cluster add-node CLUSTER_DIR \(given)`")
    }
}
