import Foundation
import XCTest

@testable import FlashmeshNode

/// The vectors the Python side writes (`python -m flashmesh.testing.swift_vectors DIR`): the directory is
/// $FLASHMESH_SWIFT_VECTORS, else the package's .build/vectors (where `make test` writes them).
struct Vectors: Decodable {
    struct XXH3: Decodable { let length: Int; let hex: String }
    struct Sizes: Decodable { let format: [[FormatEntry]]; let parse: [[ParseEntry]] }
    enum FormatEntry: Decodable {
        case count(Int), text(String)
        init(from decoder: any Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let n = try? c.decode(Int.self) { self = .count(n) } else { self = .text(try c.decode(String.self)) }
        }
    }
    typealias ParseEntry = FormatEntry
    struct Manifest: Decodable {
        struct Layer: Decodable {
            struct RAM: Decodable { let name: String; let dtype: String; let shape: [Int] }
            let layer: Int, num_experts: Int, record_size: Int, payload_bytes: Int
            let experts: [Int]
            let ram: [RAM]
        }
        let bundle: String, fingerprint: String, model_type: String
        let hidden_size: Int, top_k: Int, min_budget_bytes: Int, expert_bytes_total: Int
        let layers: [Layer]
    }
    struct Refusal: Decodable { let bundle: String; let error: String }
    struct Record: Decodable {
        let bundle: String, layer: Int, expert: Int
        let ram: [String: String]
        let kernel_fp16: [String: String]?
    }
    struct Pairs: Decodable { let bundle: String, request: String, y: String, pairs: Int, max_abs_y: Double }
    struct Messages: Decodable {
        struct Encoded: Decodable { let message: String; let hex: String }
        struct Refused: Decodable { let message: String; let hex: String }
        let encoded: [Encoded], decoded: [Encoded], refused: [Refused]
    }
    struct Trace: Decodable {
        struct Step: Decodable {
            struct After: Decodable, Equatable {
                let hits: Int, misses: Int, evictions: Int, bytes_read: Int, prefetched: Int, prefetch_used: Int
                let prefetch_wasted: Int, bytes: Int, resident: [[Int]]
            }
            let op: String, layer: Int, experts: [Int], after: After
        }
        let bundle: String, budget: Int, policy: String, effective_policy: String
        let steps: [Step]
    }

    struct AdvertisementVector: Decodable {
        let name: String, node_id: String, fingerprint: String, port: Int, txt_hex: String, instance: String
    }

    let xxh3: [XXH3]
    let sizes: Sizes
    let manifests: [Manifest]
    let refusals: [Refusal]
    let records: [Record]
    let pairs: [Pairs]
    let messages: Messages
    let cache: [Trace]
    let advertisements: [AdvertisementVector]
    let tls: TLSVectors

    struct TLSVectors: Decodable {
        struct Identity: Decodable { let path: String; let name: String?; let cn: String?; let not_after: Double?; let error: String? }
        struct Join: Decodable { let path: String; let token: String; let name: String; let damaged: String }
        let identities: [Identity]
        let join: Join
    }

    static let directory: URL = {
        if let dir = ProcessInfo.processInfo.environment["FLASHMESH_SWIFT_VECTORS"], !dir.isEmpty {
            return URL(fileURLWithPath: dir)
        }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent(".build/vectors")
    }()

    static func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    static func bytes(_ name: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path(name)) else { throw VectorsMissing() }
        return [UInt8](data)
    }

    static func floats(_ name: String) throws -> [Float] {
        let raw = try bytes(name)
        return stride(from: 0, to: raw.count, by: 4).map { i in
            Float(bitPattern: UInt32(raw[i]) | UInt32(raw[i + 1]) << 8 | UInt32(raw[i + 2]) << 16 | UInt32(raw[i + 3]) << 24)
        }
    }
}

struct VectorsMissing: Error, CustomStringConvertible {
    var description: String {
        "test vectors missing in \(Vectors.directory.path): run `make test`, or "
            + "`.venv/bin/python -m flashmesh.testing.swift_vectors \(Vectors.directory.path)` from the repository root"
    }
}

/// Loaded once for all tests; a missing directory fails every test that needs it.
let vectors: Result<Vectors, any Error> = Result {
    let index = Vectors.directory.appendingPathComponent("index.json")
    guard let data = FileManager.default.contents(atPath: index.path) else { throw VectorsMissing() }
    return try JSONDecoder().decode(Vectors.self, from: data)
}

func loadVectors() throws -> Vectors { try vectors.get() }
