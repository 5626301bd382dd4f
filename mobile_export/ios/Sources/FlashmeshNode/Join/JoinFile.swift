import CZlib
import Foundation

/// The join file `flashmesh cluster add-node NAME` writes (node/join.py): a gzip'd tar of `config.toml`
/// (role "node", the cluster token, the node's name, interfaces) and `identity/` (ca.crt, tls.crt,
/// tls.key from the cluster CA). The Swift node serves from it in place (`flashmesh-node --join FILE`);
/// the app installs it (`install(into:)`), as `flashmesh cluster join FILE` does.
public struct JoinFile: Sendable {
    public static let suffix = ".flashmesh-join"
    static let identityDir = "identity"
    static let members = [ClusterConfig.fileName] + [TLSIdentity.caFile, TLSIdentity.certFile, TLSIdentity.keyFile].map { "\(identityDir)/\($0)" }

    public let path: String
    public let config: ClusterConfig
    /// The node's identity, checked (TLSIdentity.check) when the file is read.
    public let identity: TLSIdentity

    /// Where `install(into: directory)` puts the identity.
    public static func installedIdentity(in directory: String) -> String { "\(directory)/\(identityDir)" }

    public static func read(_ path: String, now: Date = Date()) throws(UserError) -> JoinFile {
        guard let data = FileManager.default.contents(atPath: path) else {
            if FileManager.default.fileExists(atPath: path) { throw UserError("\(path) cannot be read; check its permissions") }
            throw UserError("\(path) does not exist; copy the file `flashmesh cluster add-node NAME` wrote")
        }
        let files: [String: [UInt8]]
        do {
            files = try Tar.files(try Gzip.inflate([UInt8](data)))
        } catch {
            throw UserError("\(path) is not a flashmesh join file (\(error.reason)); write it again with add-node")
        }
        guard files.keys.sorted() == members.sorted() else {
            throw UserError("\(path) is not a flashmesh join file (it holds \(files.keys.sorted().joined(separator: ", ")))")
        }
        let config = try ClusterConfig.parse(files[ClusterConfig.fileName]!, source: "\(path):\(ClusterConfig.fileName)")
        guard config.role == "node" else { throw UserError("\(path) is not a node's join file (role '\(config.role)')") }
        let identity = try TLSIdentity.check(
            ca: files["\(identityDir)/\(TLSIdentity.caFile)"]!, cert: files["\(identityDir)/\(TLSIdentity.certFile)"]!,
            key: files["\(identityDir)/\(TLSIdentity.keyFile)"]!, at: "\(path):\(identityDir)", now: now)
        return JoinFile(path: path, config: config, identity: identity)
    }

    /// Writes the identity into `directory`/identity (staged under a temporary name, then renamed over
    /// the old one; the key 0600) and returns that directory, as TLSIdentity.load reads it.
    public func install(into directory: String) throws(UserError) -> String {
        let files = FileManager.default
        let final = JoinFile.installedIdentity(in: directory)
        let staged = "\(directory)/.\(JoinFile.identityDir).partial-\(getpid())"
        do {
            try files.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try? files.removeItem(atPath: staged)
            try files.createDirectory(atPath: staged, withIntermediateDirectories: false, attributes: [.posixPermissions: 0o700])
            for (name, bytes, mode) in [
                (TLSIdentity.caFile, identity.caPEM, 0o644), (TLSIdentity.certFile, identity.certPEM, 0o644),
                (TLSIdentity.keyFile, identity.keyPEM, 0o600),
            ] {
                guard files.createFile(atPath: "\(staged)/\(name)", contents: Data(bytes), attributes: [.posixPermissions: mode]) else {
                    throw UserError("cannot write \(staged)/\(name)")
                }
            }
            if files.fileExists(atPath: final) { try files.removeItem(atPath: final) }
            try files.moveItem(atPath: staged, toPath: final)
        } catch let error as UserError {
            try? files.removeItem(atPath: staged)
            throw error
        } catch {
            try? files.removeItem(atPath: staged)
            throw UserError("cannot install the identity of \(path) into \(directory): \(error.localizedDescription)")
        }
        return final
    }
}

struct FormatError: Error {
    let reason: String
}

/// gzip (RFC 1952) through zlib's inflate.
enum Gzip {
    static func inflate(_ input: [UInt8], limit: Int = 16 << 20) throws(FormatError) -> [UInt8] {
        var stream = z_stream()
        guard inflateInit2_(&stream, 15 + 16, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw FormatError(reason: "zlib cannot start")
        }
        defer { inflateEnd(&stream) }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        var status: Int32 = Z_OK
        var input = input
        input.withUnsafeMutableBufferPointer { source in
            stream.next_in = source.baseAddress
            stream.avail_in = uInt(source.count)
            repeat {
                chunk.withUnsafeMutableBufferPointer { target in
                    stream.next_out = target.baseAddress
                    stream.avail_out = uInt(target.count)
                    status = CZlib.inflate(&stream, Z_NO_FLUSH)
                    output += target[0..<(target.count - Int(stream.avail_out))]
                }
            } while status == Z_OK && output.count <= limit
        }
        guard status == Z_STREAM_END else {
            throw FormatError(reason: output.count > limit ? "larger than a join file" : "not gzip data, or cut short")
        }
        return output
    }
}

/// The regular files of a tar archive (ustar and the pax headers Python's tarfile may add, skipped).
enum Tar {
    static func files(_ archive: [UInt8]) throws(FormatError) -> [String: [UInt8]] {
        var files: [String: [UInt8]] = [:]
        var offset = 0
        while offset + 512 <= archive.count {
            let header = archive[offset..<offset + 512]
            if header.allSatisfy({ $0 == 0 }) { return files }
            func field(_ from: Int, _ count: Int) -> String {
                String(decoding: header[(offset + from)..<(offset + from + count)].prefix { $0 != 0 }, as: UTF8.self)
            }
            let sizeText = field(124, 12).trimmingCharacters(in: .whitespaces)
            guard let size = Int(sizeText.isEmpty ? "0" : sizeText, radix: 8), size >= 0,
                offset + 512 + size <= archive.count
            else { throw FormatError(reason: "a damaged tar header") }
            let type = header[offset + 156]
            var name = field(0, 100)
            if field(257, 5) == "ustar", !field(345, 155).isEmpty { name = field(345, 155) + "/" + name }
            if type == UInt8(ascii: "0") || type == 0 { files[name] = Array(archive[(offset + 512)..<(offset + 512 + size)]) }
            offset += 512 + (size + 511) / 512 * 512
        }
        throw FormatError(reason: "the archive is cut short")
    }
}
