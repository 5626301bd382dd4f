import Foundation

/// A bundle written by `flashmesh export-ios`, opened for serving its experts: the manifest checked
/// (format, protocol, section checksums, files complete, tensor tables) as node/bundle_source.py does.
public struct ExpertBundle: Sendable {
    /// How records hold weights and how the cache holds them (node/bundle_source.py):
    /// fp16 records -> fp32 weights; affine records -> packed uint32 words with fp32 scales and biases.
    public enum Weights: Equatable, Sendable {
        case float16
        case affine(bits: Int, groupSize: Int, int8Offset: Int?)  // int8Offset set: records hold int8 values
    }

    /// The architectures whose routed experts are SwiGLU (what the CPU compute implements): the ones
    /// `export-ios` writes.
    public static let swigluModelTypes: Set<String> = ["qwen3_moe", "deepseek_v3", "mixtral"]
    static let projections = ["gate_proj", "up_proj", "down_proj"]

    public let path: String
    public let manifest: BundleManifest
    public let weights: Weights
    public let hiddenSize: Int
    public let topK: Int
    public let modelType: String
    public let shard: Shard?
    /// MoE layers in layer order.
    public let layers: [LayerPlan]

    public static func open(_ path: String, shard: Shard? = nil) throws(UserError) -> ExpertBundle {
        let manifestPath = path + "/manifest.json"
        guard let data = FileManager.default.contents(atPath: manifestPath) else {
            throw UserError(
                "\(path) is not a flashmesh iOS bundle (no manifest.json); create one with `flashmesh export-ios`")
        }
        let text: JSONText
        do {
            text = try JSONText.parse([UInt8](data))
        } catch {
            throw UserError("\(manifestPath) is not valid JSON (\(error)); re-export the bundle")
        }
        let format = text["bundle_format"].flatMap(\.integer)
        guard format == BundleManifest.bundleFormat else {
            let got = format.map(String.init) ?? "None"
            throw UserError(
                "\(manifestPath): bundle format \(got), this flashmesh reads \(BundleManifest.bundleFormat); re-export the bundle")
        }
        if let edited = editedSection(text) {
            throw UserError("\(manifestPath): section '\(edited)' was edited; re-export the bundle")
        }
        let manifest: BundleManifest
        do {
            manifest = try JSONDecoder().decode(BundleManifest.self, from: data)
        } catch {
            throw UserError("\(manifestPath) lacks what a node needs (\(decodingReason(error))); re-export the bundle")
        }
        guard manifest.protocolVersion == BundleManifest.protocolVersion else {
            throw UserError(
                "\(path) speaks node protocol \(manifest.protocolVersion), this flashmesh "
                    + "\(BundleManifest.protocolVersion); re-export the bundle with this flashmesh")
        }
        return try ExpertBundle(path: path, manifest: manifest, shard: shard)
    }

    /// The first section (in manifest order) whose checksum differs from `section_checksums`.
    static func editedSection(_ manifest: JSONText) -> String? {
        guard case let .object(members) = manifest else { return "manifest" }
        let stored = manifest["section_checksums"]
        for (key, value) in members where key != "section_checksums" {
            let digest = Checksum.xxh3Hex(Array(value.pythonSortedDump().utf8))
            if stored?[key] != .string(digest) { return key }
        }
        return nil
    }

    private init(path: String, manifest: BundleManifest, shard: Shard?) throws(UserError) {
        self.path = path
        self.manifest = manifest
        self.shard = shard
        hiddenSize = try manifest.config.hiddenSize()
        topK = try manifest.config.expertsPerToken()
        modelType = manifest.config.modelType ?? ""
        guard ExpertBundle.swigluModelTypes.contains(modelType) else {
            throw UserError(
                "the Swift node computes SwiGLU experts (\(ExpertBundle.swigluModelTypes.sorted().joined(separator: ", "))), "
                    + "not model_type '\(modelType)'; serve this bundle with `flashmesh node serve --bundle`")
        }
        weights = try ExpertBundle.weights(manifest.quantization)
        var layers: [LayerPlan] = []
        for record in manifest.layers.sorted(by: { $0.layer < $1.layer }) {
            try ExpertBundle.checkFile(path: path, record: record)
            let ram = try ExpertBundle.ramTensors(path: path, record: record, weights: weights, hidden: hiddenSize)
            layers.append(LayerPlan(record: record, ram: ram, shard: shard))
        }
        guard !layers.isEmpty else { throw UserError("\(path) holds no MoE layers; re-export the bundle") }
        self.layers = layers
    }

    public func layer(_ index: Int) -> LayerPlan? {
        layers.first { $0.layer == index }
    }

    /// Payload bytes of every routed expert of the full model (node/store_format.py `expert_bytes_total`).
    public var expertBytesTotal: Int { layers.reduce(0) { $0 + $1.numExperts * $1.payloadBytes } }

    /// One layer's top-k experts must fit in the cache at once.
    public var minimumBudget: Int { topK * (layers.map(\.payloadBytes).max() ?? 0) }

    private static func weights(_ q: Quantization) throws(UserError) -> Weights {
        switch q.expertInput {
        case "float16":
            return .float16
        case "float16_cpu_dequant", "int8":
            guard let bits = q.bits, [2, 4, 8].contains(bits), let group = q.groupSize, group > 0 else {
                throw UserError("the bundle's quantization names no affine bits/group_size; re-export the bundle")
            }
            return .affine(bits: bits, groupSize: group, int8Offset: q.expertInput == "int8" ? (q.int8Offset ?? 0) : nil)
        default:
            throw UserError("bundle expert input mode '\(q.expertInput)' is unknown; re-export the bundle")
        }
    }

    private static func checkFile(path: String, record: RecordLayout) throws(UserError) {
        let file = path + "/" + record.file
        let expected = record.experts.count * record.recordSize
        let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size] as? Int) ?? nil
        guard let size, size >= expected else {
            let got = size.map(String.init) ?? "missing"
            throw UserError("\(file): \(got) of \(expected) bytes; the bundle is incomplete, re-copy or re-export it")
        }
        guard record.recordSize > 0, record.recordSize % RecordReader.recordAlignment == 0,
            record.checksums.count == record.experts.count
        else {
            throw UserError("\(file): records are not \(RecordReader.recordAlignment)-byte aligned; re-export the bundle")
        }
    }

    /// The record's tensor table checked against the expert shapes, and the tensors the cache holds.
    private static func ramTensors(path: String, record: RecordLayout, weights: Weights, hidden: Int)
        throws(UserError) -> [RAMTensor]
    {
        let quantized = weights != .float16
        let names = Set(projections.flatMap { p in (quantized ? ["weight", "scales", "biases"] : ["weight"]).map { "\(p).\($0)" } })
        let table = Dictionary(record.tensors.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        guard Set(table.keys) == names, table.count == record.tensors.count else {
            throw UserError("\(path): layer \(record.layer) records hold \(record.tensors.map(\.name))")
        }
        let bad = UserError("\(path): layer \(record.layer) tensor table does not describe SwiGLU experts of width \(hidden)")
        guard let gate = table["gate_proj.weight"], gate.shape.count == 2 else { throw bad }
        let intermediate = gate.shape[0]
        var ram: [RAMTensor] = []
        for p in projections {
            let rows = p == "down_proj" ? hidden : intermediate
            let cols = p == "down_proj" ? intermediate : hidden
            for entry in record.tensors where entry.name.hasPrefix(p + ".") {
                let expected: (type: String, shape: [Int], ram: RAMTensor)
                switch (weights, entry.name.hasSuffix(".weight")) {
                case (.float16, _):
                    expected = ("float16", [rows, cols], RAMTensor(name: entry.name, type: .float32, shape: [rows, cols]))
                case let (.affine(bits, _, offset), true):
                    guard (cols * bits) % 32 == 0 else { throw bad }
                    let words = RAMTensor(name: entry.name, type: .uint32, shape: [rows, cols * bits / 32])
                    expected = offset == nil ? ("uint32", words.shape, words) : ("int8", [rows, cols], words)
                case let (.affine(_, group, _), false):
                    guard cols % group == 0 else { throw bad }
                    let shape = [rows, cols / group]
                    expected = ("float16", shape, RAMTensor(name: entry.name, type: .float32, shape: shape))
                }
                let itemSize = ElementType(rawValue: entry.dtype)?.size ?? 0
                guard entry.dtype == expected.type, entry.shape == expected.shape,
                    entry.nbytes == entry.shape.reduce(itemSize, *), entry.offset >= 0,
                    entry.offset + entry.nbytes <= record.recordSize
                else { throw bad }
                ram.append(expected.ram)
            }
        }
        return ram
    }
}

extension JSONText {
    var integer: Int? {
        guard case let .number(literal) = self else { return nil }
        return Int(literal)
    }
}

func decodingReason(_ error: any Error) -> String {
    guard let error = error as? DecodingError else { return "\(error)" }
    switch error {
    case let .keyNotFound(key, context):
        return "no '\((context.codingPath + [key]).map(\.stringValue).joined(separator: "."))'"
    case let .typeMismatch(_, context), let .valueNotFound(_, context), let .dataCorrupted(context):
        return "'\(context.codingPath.map(\.stringValue).joined(separator: "."))' is malformed"
    @unknown default:
        return "\(error)"
    }
}
