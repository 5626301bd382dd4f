import XCTest

@testable import FlashmeshNode

/// Per-(row, expert) outputs of the Swift node against the Python bundle node on the same requests.
///
/// Tolerance: both compute in fp32 from the same fp32 weights (fp16 records widened exactly; affine
/// weights dequantized with one rounding per operation, bit for bit as RecordTests checks), so they
/// differ only in summation order (OpenBLAS vs MLX's kernels) over K = hidden or intermediate terms
/// and in the exp of SiLU. Reordering a K-term fp32 sum moves it by at most about K * 2^-24 of the sum
/// of the terms' magnitudes; with K = 64 here that is 4e-6 relative, so we allow 2e-5 x max|y|
/// (measured: 5e-7).
final class ComputeTests: XCTestCase {
    static let relativeTolerance: Float = 2e-5

    func testPairOutputsMatchThePythonNode() throws {
        let v = try loadVectors()
        XCTAssertGreaterThanOrEqual(v.pairs.count, 8)
        var worst: Float = 0
        for entry in v.pairs {
            let bundle = try ExpertBundle.open(Vectors.path(entry.bundle))
            var options = NodeService.Options(ramBudget: bundle.expertBytesTotal, token: "t", name: "test")
            options.flashGBps = 1
            let service = try NodeService(bundle: bundle, options: options)
            defer { service.close() }
            let bytes = try Vectors.bytes(entry.request)
            let request = try ComputeRequest(serialized: bytes)
            let reply = try service.compute(request, size: bytes.count)
            let want = try Vectors.floats(entry.y)
            let y = try XCTUnwrap(reply.y)
            XCTAssertEqual(y.dtype, "float32")
            XCTAssertEqual(y.shape, [Int64(entry.pairs), Int64(bundle.hiddenSize)])
            let got = y.data.withUnsafeBytes { raw in (0..<raw.count / 4).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
            let error = zip(got, want).map { abs($0 - $1) }.max() ?? .infinity
            let scale = Float(entry.max_abs_y)
            worst = max(worst, error / scale)
            XCTAssertLessThanOrEqual(error, ComputeTests.relativeTolerance * scale, "\(entry.request)")
        }
        print("per-pair outputs vs the Python node: worst error \(worst) x max|y|")
    }
}
