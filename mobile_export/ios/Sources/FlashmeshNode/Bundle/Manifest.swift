/// The parts of a bundle's `manifest.json` (docs/ios.md) a node needs, decoded with `Codable`.
public struct BundleManifest: Decodable, Sendable {
    public static let bundleFormat = 1
    public static let protocolVersion = 1  // protos/__init__.py PROTOCOL_VERSION

    public var bundleFormat: Int
    public var protocolVersion: Int
    public var target: String
    public var storeFingerprint: String
    public var config: ModelConfig
    public var quantization: Quantization
    public var layers: [RecordLayout]
    public var bytesPerToken: BytesPerToken?

    enum CodingKeys: String, CodingKey {
        case bundleFormat = "bundle_format"
        case protocolVersion = "protocol_version"
        case target
        case storeFingerprint = "store_fingerprint"
        case config, quantization, layers
        case bytesPerToken = "bytes_per_token"
    }
}

/// Flash bytes a decoded token reads with every expert missing the cache (docs/ios.md).
public struct BytesPerToken: Decodable, Sendable {
    /// Weight bytes of the top-k experts of every MoE layer.
    public var payload: Int
    /// Whole aligned records: what is read from flash.
    public var records: Int

    enum CodingKeys: String, CodingKey {
        case payload = "this_bundle_payload"
        case records = "this_bundle_records"
    }
}

/// The model's config.json, as far as a node needs it: width, experts per token, architecture.
public struct ModelConfig: Decodable, Sendable {
    public var modelType: String?
    var ownHiddenSize: Int?
    var ownTopK: Int?
    var textConfig: TextConfig?

    struct TextConfig: Decodable, Sendable {
        var hiddenSize: Int?
        var topK: Int?

        init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: ConfigKey.self)
            hiddenSize = try c.decodeIfPresent(Int.self, forKey: ConfigKey("hidden_size"))
            topK = try ModelConfig.topK(in: c)
        }
    }

    struct ConfigKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ name: String) { stringValue = name }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: ConfigKey.self)
        modelType = try c.decodeIfPresent(String.self, forKey: ConfigKey("model_type"))
        ownHiddenSize = try c.decodeIfPresent(Int.self, forKey: ConfigKey("hidden_size"))
        ownTopK = try ModelConfig.topK(in: c)
        textConfig = try c.decodeIfPresent(TextConfig.self, forKey: ConfigKey("text_config"))
    }

    // The keys node/store_format.py `Manifest.top_k` looks for, in its order.
    static func topK(in c: KeyedDecodingContainer<ConfigKey>) throws -> Int? {
        for key in ["num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token"] {
            if let k = try c.decodeIfPresent(Int.self, forKey: ConfigKey(key)) { return k }
        }
        return nil
    }

    public func hiddenSize() throws(UserError) -> Int {
        guard let size = ownHiddenSize ?? textConfig?.hiddenSize else {
            throw UserError("the model config names no hidden_size")
        }
        return size
    }

    public func expertsPerToken() throws(UserError) -> Int {
        guard let k = ownTopK ?? textConfig?.topK else {
            throw UserError("the model config names no experts-per-token count")
        }
        return k
    }
}

/// How the bundle's records hold expert weights (docs/ios.md, "How quantized experts reach the kernel").
public struct Quantization: Decodable, Sendable {
    public enum ExpertInput: String, Decodable, Sendable {
        case float16
        case float16CPUDequant = "float16_cpu_dequant"
        case int8
    }

    public var expertInput: String
    public var bits: Int?
    public var groupSize: Int?
    public var int8Offset: Int?

    enum CodingKeys: String, CodingKey {
        case expertInput = "expert_input"
        case bits
        case groupSize = "group_size"
        case int8Offset = "int8_offset"
    }
}

/// One MoE layer's records: file, record size (a multiple of 16 KiB), tensor table, experts, checksums.
public struct RecordLayout: Decodable, Sendable {
    public var layer: Int
    public var module: String
    public var numExperts: Int
    public var recordSize: Int
    public var tensors: [TensorEntry]
    public var experts: [Int]
    public var checksums: [String]
    public var file: String

    enum CodingKeys: String, CodingKey {
        case layer, module
        case numExperts = "num_experts"
        case recordSize = "record_size"
        case tensors, experts, checksums, file
    }
}

/// A tensor inside a record: name relative to the expert module ("gate_proj.weight"), dtype, shape,
/// byte offset from the record's start and byte count.
public struct TensorEntry: Codable, Equatable, Sendable {
    public var name: String
    public var dtype: String
    public var shape: [Int]
    public var offset: Int
    public var nbytes: Int
}
