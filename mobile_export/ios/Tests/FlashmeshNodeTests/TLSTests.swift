import Foundation
import XCTest

@testable import FlashmeshNode

/// Identities and join files as `flashmesh cluster init` / `add-node` write them (Python's vectors):
/// what the Swift node reads of them, and its refusals, word for word node/tls.py's.
final class TLSTests: XCTestCase {
    func testIdentitiesReadAndRefusedAsPythonDoes() throws {
        let v = try loadVectors().tls
        let root = Vectors.path("tls")
        XCTAssertGreaterThanOrEqual(v.identities.count, 12)
        for case_ in v.identities {
            do {
                let identity = try TLSIdentity.load("\(root)/\(case_.path)", name: case_.name)
                XCTAssertNil(case_.error, "\(case_.path): loaded, Python refuses it: \(case_.error ?? "")")
                XCTAssertEqual(identity.name, case_.cn)
                XCTAssertEqual(identity.notAfter.timeIntervalSince1970, try XCTUnwrap(case_.not_after))
                XCTAssertTrue(identity.certPEM.starts(with: Array("-----BEGIN CERTIFICATE-----".utf8)))
            } catch {
                XCTAssertEqual(error.description, case_.error?.replacingOccurrences(of: "$VECTORS", with: root), case_.path)
            }
        }
    }

    func testJoinFileReadInstalledAndRefused() throws {
        let v = try loadVectors().tls.join
        let join = try JoinFile.read(Vectors.path("tls/\(v.path)"))
        XCTAssertEqual(join.config, ClusterConfig(role: "node", token: v.token, tls: nil, interfaces: ["auto"], name: v.name))
        XCTAssertEqual(join.identity.name, v.name)
        let home = FileManager.default.temporaryDirectory.appendingPathComponent("swifttls-join-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: home) }
        let installed = try join.install(into: home)
        let again = try JoinFile.read(Vectors.path("tls/\(v.path)")).install(into: home)  // replaces the old one
        XCTAssertEqual(installed, again)
        let loaded = try TLSIdentity.load(installed, name: v.name)
        XCTAssertEqual([loaded.caPEM, loaded.certPEM, loaded.keyPEM], [join.identity.caPEM, join.identity.certPEM, join.identity.keyPEM])
        let mode = try FileManager.default.attributesOfItem(atPath: "\(installed)/tls.key")[.posixPermissions] as? Int
        XCTAssertEqual(mode, 0o600)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: home), ["identity"])  // nothing staged left
        let damaged = Vectors.path("tls/\(v.damaged)")
        XCTAssertThrowsError(try JoinFile.read(damaged)) { error in
            XCTAssertTrue("\(error)".hasPrefix("\(damaged) is not a flashmesh join file"), "\(error)")
        }
        XCTAssertThrowsError(try JoinFile.read(Vectors.path("tls/cluster/ca/ca.crt"))) { error in
            XCTAssertTrue("\(error)".contains("is not a flashmesh join file"), "\(error)")
        }
    }

    func testConfigTOMLAsTomliWritesIt() throws {
        let text = "role = \"node\"\ntoken = \"a\\\"b\\u00fc\"  # comment\ninterfaces = [\n    \"192.168.1.10\",\n    \"10.0.0.2\",\n]\n"
        let config = try ClusterConfig.parse(Array(text.utf8), source: "config.toml")
        XCTAssertEqual(config, ClusterConfig(role: "node", token: "a\"bü", tls: nil, interfaces: ["192.168.1.10", "10.0.0.2"], name: nil))
        for (bad, reason) in [("role = node\n", "expected a \"string\""), ("port = \"1\"\nrole = \"n\"\ntoken = \"t\"\n", "unexpected key 'port'")] {
            XCTAssertThrowsError(try ClusterConfig.parse(Array(bad.utf8), source: "config.toml")) { error in
                XCTAssertTrue("\(error)".contains(reason), "\(error)")
            }
        }
    }

    /// The app joins a cluster from the join file: token, name and identity taken; it then serves
    /// mutual TLS only, and a name other than the certificate's is refused before anything listens.
    @MainActor
    func testControllerImportsAJoinFileAndServesTLS() async throws {
        let v = try loadVectors()
        let (controller, transport, _) = makeTestController()
        let home = FileManager.default.temporaryDirectory.appendingPathComponent("swifttls-app-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: home) }
        await controller.importJoinFile(Vectors.path("tls/\(v.tls.join.damaged)"), keepIn: home)
        XCTAssertNil(controller.settings.tls)
        XCTAssertTrue(controller.notice?.contains("is not a flashmesh join file") ?? false, controller.notice ?? "")
        await controller.importJoinFile(Vectors.path("tls/\(v.tls.join.path)"), keepIn: home)
        XCTAssertEqual(controller.settings.token, v.tls.join.token)
        XCTAssertEqual(controller.settings.name, v.tls.join.name)
        XCTAssertEqual(controller.settings.tls, "\(home)/identity")
        XCTAssertTrue(controller.notice?.hasPrefix("joined the cluster as air: mutual TLS") ?? false, controller.notice ?? "")
        await controller.openBundle(Vectors.path(v.manifests[0].bundle))
        await controller.start()
        guard case let .serving(info) = controller.phase else { return XCTFail("not serving: \(controller.notice ?? "")") }
        XCTAssertTrue(info.security.hasPrefix("mutual TLS as air, certificate valid until "), info.security)
        XCTAssertEqual(transport.tlsUsed.withLock { $0?.name }, "air")
        await controller.stop()
        controller.settings.name = "bedroom"
        await controller.start()
        XCTAssertEqual(controller.phase, .idle)
        XCTAssertTrue(controller.notice?.contains("the certificate is node air's") ?? false, controller.notice ?? "")
        controller.leaveCluster()
        await controller.start()
        guard case let .serving(plain) = controller.phase else { return XCTFail("not serving: \(controller.notice ?? "")") }
        XCTAssertEqual(plain.security, "plaintext (cluster token only)")
        XCTAssertNil(transport.tlsUsed.withLock { $0 })
        await controller.stop()
    }
}
