import Foundation

/// The fields of an X.509 certificate that node/tls.py checks: names, validity, extended key usage,
/// key identifiers and the public key. Read from the DER of a PEM file (RFC 5280 4.1).
struct Certificate: Sendable {
    /// What the extended key usage makes it: a node's (serverAuth) or a coordinator's (clientAuth).
    enum Role: String, Sendable {
        case node, coordinator
    }

    let subject: ArraySlice<UInt8>  // the Name as encoded, compared byte for byte with an issuer
    let issuer: ArraySlice<UInt8>
    let commonName: String
    let notBefore: Date
    let notAfter: Date
    let role: Role?
    let subjectKeyIdentifier: ArraySlice<UInt8>?
    let authorityKeyIdentifier: ArraySlice<UInt8>?
    let publicKey: ArraySlice<UInt8>  // subjectPublicKeyInfo's BIT STRING

    // OIDs as DER content bytes.
    static let commonNameOID: [UInt8] = [0x55, 0x04, 0x03]  // 2.5.4.3
    static let extendedKeyUsageOID: [UInt8] = [0x55, 0x1D, 0x25]  // 2.5.29.37
    static let subjectKeyIdentifierOID: [UInt8] = [0x55, 0x1D, 0x0E]  // 2.5.29.14
    static let authorityKeyIdentifierOID: [UInt8] = [0x55, 0x1D, 0x23]  // 2.5.29.35
    static let serverAuthOID: [UInt8] = [0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01]  // 1.3.6.1.5.5.7.3.1
    static let clientAuthOID: [UInt8] = [0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02]  // 1.3.6.1.5.5.7.3.2

    init(der: [UInt8]) throws(DER.Malformed) {
        let certificate = try DER.parse(der[...]).expect(DER.sequence).children()
        guard certificate.count == 3 else { throw DER.Malformed() }
        var fields = try certificate[0].expect(DER.sequence).children()[...]
        if fields.first?.tag == 0xA0 { fields = fields.dropFirst() }  // [0] version
        guard fields.count >= 6 else { throw DER.Malformed() }
        let f = Array(fields)
        issuer = try f[2].expect(DER.sequence).encoded
        let validity = try f[3].expect(DER.sequence).children()
        guard validity.count == 2 else { throw DER.Malformed() }
        notBefore = try validity[0].time()
        notAfter = try validity[1].time()
        subject = try f[4].expect(DER.sequence).encoded
        commonName = try Certificate.commonName(of: f[4])
        let keyInfo = try f[5].expect(DER.sequence).children()
        guard keyInfo.count == 2 else { throw DER.Malformed() }
        publicKey = try keyInfo[1].bitString()
        var role: Role?
        var ski: ArraySlice<UInt8>?
        var aki: ArraySlice<UInt8>?
        if let extensions = f.dropFirst(6).first(where: { $0.tag == 0xA3 }) {
            for item in try extensions.children().first?.expect(DER.sequence).children() ?? [] {
                let parts = try item.expect(DER.sequence).children()
                guard parts.count >= 2, let value = parts.last, value.tag == DER.octets else { throw DER.Malformed() }
                let inner = try DER.parse(value.content)
                switch Array(try parts[0].expect(DER.oid).content) {
                case Certificate.extendedKeyUsageOID:
                    let usages = try inner.expect(DER.sequence).children().map { Array($0.content) }
                    role = usages.contains(Certificate.serverAuthOID)
                        ? .node : usages.contains(Certificate.clientAuthOID) ? .coordinator : nil
                case Certificate.subjectKeyIdentifierOID:
                    ski = try inner.expect(DER.octets).content
                case Certificate.authorityKeyIdentifierOID:
                    aki = try inner.expect(DER.sequence).children().first { $0.tag == 0x80 }?.content  // [0] keyIdentifier
                default:
                    break
                }
            }
        }
        self.role = role
        subjectKeyIdentifier = ski
        authorityKeyIdentifier = aki
    }

    private static func commonName(of name: DER) throws(DER.Malformed) -> String {
        for rdn in try name.children() {
            for attribute in try rdn.expect(DER.set).children() {
                let parts = try attribute.expect(DER.sequence).children()
                if parts.count == 2, Array(parts[0].content) == commonNameOID {
                    return String(decoding: parts[1].content, as: UTF8.self)
                }
            }
        }
        return ""
    }

    /// Whether `ca` issued it, by name and key identifier (what tells one cluster's CA from another's;
    /// the signature itself is checked by gRPC in every handshake).
    func names(issuer ca: Certificate) -> Bool {
        guard issuer == ca.subject else { return false }
        guard let aki = authorityKeyIdentifier, let ski = ca.subjectKeyIdentifier else { return true }
        return aki == ski
    }
}

/// The public key a private key carries (PKCS#8 "PRIVATE KEY" or SEC1 "EC PRIVATE KEY" for EC keys,
/// which `cluster init` writes; PKCS#8 or PKCS#1 RSA keys), in the form of a certificate's
/// subjectPublicKeyInfo bits, or nil when the key does not say (then the handshake decides).
enum PrivateKey {
    static func publicKey(pem label: String, der: [UInt8]) throws(DER.Malformed) -> [UInt8]? {
        var element = try DER.parse(der[...]).expect(DER.sequence)
        if label == "PRIVATE KEY" {  // PrivateKeyInfo: version, algorithm, OCTET STRING of the key
            let parts = try element.children()
            guard parts.count >= 3 else { throw DER.Malformed() }
            element = try DER.parse(try parts[2].expect(DER.octets).content).expect(DER.sequence)
        }
        let parts = try element.children()
        if label == "RSA PRIVATE KEY" || (parts.count >= 3 && parts[1].tag == DER.integer) {
            // RSAPrivateKey: version, modulus, publicExponent, ... -> RSAPublicKey SEQUENCE { n, e }
            let body = Array(parts[1].encoded) + Array(parts[2].encoded)
            return [DER.sequence] + length(body.count) + body
        }
        // ECPrivateKey: version, privateKey, [0] parameters, [1] publicKey BIT STRING
        guard let tagged = parts.first(where: { $0.tag == 0xA1 }) else { return nil }
        return Array(try DER.parse(tagged.content).bitString())
    }

    private static func length(_ n: Int) -> [UInt8] {
        if n < 0x80 { return [UInt8(n)] }
        let bytes = withUnsafeBytes(of: UInt32(n).bigEndian) { Array($0) }.drop { $0 == 0 }
        return [0x80 | UInt8(bytes.count)] + bytes
    }
}

/// The first PEM block of `text` with its label ("CERTIFICATE", "PRIVATE KEY", ...), decoded.
enum PEM {
    static func decode(_ text: [UInt8]) -> (label: String, der: [UInt8])? {
        let string = String(decoding: text, as: UTF8.self)
        guard let begin = string.range(of: "-----BEGIN "), let labelEnd = string.range(of: "-----", range: begin.upperBound..<string.endIndex)
        else { return nil }
        let label = String(string[begin.upperBound..<labelEnd.lowerBound])
        guard let end = string.range(of: "-----END \(label)-----", range: labelEnd.upperBound..<string.endIndex),
            let data = Data(base64Encoded: String(string[labelEnd.upperBound..<end.lowerBound]), options: .ignoreUnknownCharacters),
            !data.isEmpty
        else { return nil }
        return (label, [UInt8](data))
    }
}
