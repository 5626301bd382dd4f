import XCTest

@testable import FlashmeshNode

final class ManifestTests: XCTestCase {
    func testManifestsReadAsThePythonNodeReadsThem() throws {
        let v = try loadVectors()
        XCTAssertEqual(v.manifests.count, 4)
        for m in v.manifests {
            let bundle = try ExpertBundle.open(Vectors.path(m.bundle))
            XCTAssertEqual(bundle.manifest.storeFingerprint, m.fingerprint)
            XCTAssertEqual(bundle.hiddenSize, m.hidden_size)
            XCTAssertEqual(bundle.topK, m.top_k)
            XCTAssertEqual(bundle.modelType, m.model_type)
            XCTAssertEqual(bundle.minimumBudget, m.min_budget_bytes)
            XCTAssertEqual(bundle.expertBytesTotal, m.expert_bytes_total)
            XCTAssertEqual(bundle.layers.map(\.layer), m.layers.map(\.layer))
            for (plan, want) in zip(bundle.layers, m.layers) {
                XCTAssertEqual(plan.numExperts, want.num_experts)
                XCTAssertEqual(plan.recordSize, want.record_size)
                XCTAssertEqual(plan.payloadBytes, want.payload_bytes, "\(m.bundle) layer \(plan.layer)")
                XCTAssertEqual(plan.experts, want.experts)
                XCTAssertEqual(plan.ram.map(\.name), want.ram.map(\.name))
                XCTAssertEqual(plan.ram.map(\.type.rawValue), want.ram.map(\.dtype))
                XCTAssertEqual(plan.ram.map(\.shape), want.ram.map(\.shape))
            }
        }
    }

    /// An unknown bundle_format or protocol_version, or an edited section: Python's own one line.
    func testRefusalsAreThePythonNodesOneLine() throws {
        let v = try loadVectors()
        XCTAssertEqual(v.refusals.count, 3)
        for refusal in v.refusals {
            let path = Vectors.path(refusal.bundle)
            XCTAssertThrowsError(try ExpertBundle.open(path)) { error in
                XCTAssertEqual("\(error)", refusal.error.replacingOccurrences(of: "{bundle}", with: path))
            }
        }
        XCTAssertThrowsError(try ExpertBundle.open("/nonexistent")) { error in
            XCTAssertTrue("\(error)".contains("is not a flashmesh iOS bundle"))
        }
    }

    func testShardsHoldWhatFlashmeshShardWouldPutThere() throws {
        let v = try loadVectors()
        let path = Vectors.path(v.manifests[0].bundle)
        let halves = try (0..<2).map { try ExpertBundle.open(path, shard: Shard(count: 2, index: $0)) }
        for (i, half) in halves.enumerated() {
            XCTAssertEqual(half.layers[0].experts, half.layers[0].experts.filter { $0 % 2 == i })
            XCTAssertFalse(half.layers[0].experts.isEmpty)
        }
        XCTAssertThrowsError(try Shard(count: 2, index: 2))
    }
}

final class RecordTests: XCTestCase {
    /// Records read (aligned, O_DIRECT where the filesystem allows) and converted to what the cache holds
    /// equal the Python node's arrays bit for bit; affine records dequantize into the iOS 18 kernel's fp16
    /// inputs bit for bit.
    func testConversionAndDequantizationBitForBit() throws {
        let v = try loadVectors()
        XCTAssertFalse(v.records.isEmpty)
        for entry in v.records {
            let bundle = try ExpertBundle.open(Vectors.path(entry.bundle))
            let reader = try RecordReader(bundle: bundle)
            defer { reader.close() }
            guard let plan = bundle.layer(entry.layer) else { return XCTFail("no layer \(entry.layer)") }
            let record = try reader.read(plan, [entry.expert])[entry.expert]!
            let slab = Slab(tensors: plan.ram, slots: 1, experts: 1)
            RecordConversion.fill(slab, slot: 0, record: record.pointer, layer: plan, weights: bundle.weights)
            for (i, tensor) in plan.ram.enumerated() {
                let want = try Vectors.bytes(entry.ram[tensor.name]!)
                let got = [UInt8](UnsafeRawBufferPointer(start: slab.pointer(tensor: i, slot: 0), count: tensor.nbytes))
                XCTAssertEqual(got, want, "\(entry.bundle) layer \(entry.layer) expert \(entry.expert) \(tensor.name)")
            }
            guard let kernel = entry.kernel_fp16 else { continue }
            let weights = ExpertDispatch.weights(slab, slot: 0, plan: plan, bundle: bundle)
            for (name, matrix) in [("gate", weights.gate), ("up", weights.up), ("down", weights.down)] {
                guard case let .affine(words, scales, biases, rows, cols, bits, group) = matrix else {
                    return XCTFail("\(name) is not affine")
                }
                var half = [Float16](repeating: 0, count: rows * cols)
                half.withUnsafeMutableBufferPointer {
                    Dequantize.affineToHalf(words: words, scales: scales, biases: biases, rows: rows, cols: cols,
                                            bits: bits, groupSize: group, into: $0.baseAddress!)
                }
                let want = try Vectors.bytes(kernel[name]!)
                XCTAssertEqual(half.withUnsafeBytes { Array($0) }, want, "\(entry.bundle) \(name) dequantized")
            }
        }
    }

    func testDamagedRecordIsAnErrorNamingLayerAndExpert() throws {
        let v = try loadVectors()
        let source = Vectors.path(v.manifests[0].bundle)
        let copy = NSTemporaryDirectory() + "swift-test-damaged-\(getpid()).flashmesh-ios"
        try? FileManager.default.removeItem(atPath: copy)
        try FileManager.default.copyItem(atPath: source, toPath: copy)
        defer { try? FileManager.default.removeItem(atPath: copy) }
        let bundle = try ExpertBundle.open(copy)
        let plan = bundle.layers[0]
        let file = copy + "/" + plan.file
        var data = try Data(contentsOf: URL(fileURLWithPath: file))
        data[2 * plan.recordSize + 100] ^= 0xFF
        try data.write(to: URL(fileURLWithPath: file))
        let reader = try RecordReader(bundle: bundle)
        defer { reader.close() }
        XCTAssertThrowsError(try reader.read(plan, [1, 2, 3])) { error in
            XCTAssertEqual(error as? RecordError, RecordError(layer: plan.layer, expert: 2, reason: .checksumMismatch(file: file)))
            XCTAssertTrue("\(error)".hasPrefix("layer \(plan.layer) expert 2: record checksum mismatch in "))
        }
        XCTAssertNoThrow(try reader.read(plan, [1, 3]))
        // cut short: the file ends inside expert 2's record
        try data.prefix(2 * plan.recordSize + 4096).write(to: URL(fileURLWithPath: file))
        let cut = try RecordReader(bundle: bundle, pageCache: true)
        defer { cut.close() }
        XCTAssertThrowsError(try cut.read(plan, [2])) { error in
            XCTAssertEqual(error as? RecordError,
                           RecordError(layer: plan.layer, expert: 2, reason: .shortRead(got: 4096, expected: plan.recordSize)))
        }
    }
}
