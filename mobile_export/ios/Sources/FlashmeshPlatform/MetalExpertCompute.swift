#if canImport(Metal)
import FlashmeshNode
import Foundation
import Metal

/// SwiGLU experts on the GPU through Metal (Kernels/expert_kernels.metal), on the cache's own memory:
/// each slab region is wrapped once as a shared MTLBuffer without copying, and the kernels read the
/// weights as held (fp32, or affine words with fp32 scales/biases, dequantized in the kernel). One
/// command buffer per wave of experts. NOT BUILT on the Linux machines this was written on (docs/ios.md).
public final class MetalExpertCompute: ExpertCompute, @unchecked Sendable {
    private struct Params {  // MatmulParams in the .metal file: five 32-bit fields
        var rows: UInt32, outDim: UInt32, inDim: UInt32, bits: UInt32, groupSize: UInt32
    }

    private let device: any MTLDevice
    private let queue: any MTLCommandQueue
    private let dense: any MTLComputePipelineState
    private let affine: any MTLComputePipelineState
    private let siluMultiply: any MTLComputePipelineState
    private var regions: [(start: UInt, count: Int, buffer: any MTLBuffer)] = []  // by start address
    private let fallback = CPUExpertCompute()

    /// nil where there is no Metal device; a kernel that does not compile is an error.
    public init?() throws(UserError) {
        guard let device = MTLCreateSystemDefaultDevice(), let queue = device.makeCommandQueue() else { return nil }
        guard let url = Bundle.module.url(forResource: "expert_kernels", withExtension: "metal"),
            let source = try? String(contentsOf: url, encoding: .utf8)
        else { throw UserError("the app lacks its Metal kernels (expert_kernels.metal); rebuild it") }
        do {
            let library = try device.makeLibrary(source: source, options: nil)
            func pipeline(_ name: String) throws -> any MTLComputePipelineState {
                guard let function = library.makeFunction(name: name) else { throw UserError("no kernel \(name)") }
                return try device.makeComputePipelineState(function: function)
            }
            dense = try pipeline("matmul_dense")
            affine = try pipeline("matmul_affine")
            siluMultiply = try pipeline("silu_multiply")
        } catch {
            throw UserError("the Metal kernels do not compile on \(device.name): \(error)")
        }
        self.device = device
        self.queue = queue
    }

    public var name: String { "gpu (Metal, \(device.name))" }

    public func prepare(memory: [UnsafeRawBufferPointer]) throws(UserError) {
        var mapped: [(start: UInt, count: Int, buffer: any MTLBuffer)] = []
        for region in memory {
            guard let base = region.baseAddress, region.count > 0 else { continue }
            guard let buffer = device.makeBuffer(
                bytesNoCopy: UnsafeMutableRawPointer(mutating: base), length: region.count, options: .storageModeShared,
                deallocator: nil)
            else { throw UserError("Metal cannot map a \(ByteSize.format(region.count)) cache region") }
            mapped.append((UInt(bitPattern: base), region.count, buffer))
        }
        regions = mapped.sorted { $0.start < $1.start }
    }

    public func swiglu(_ calls: [ExpertCall], x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
        if let problem = gpuSwiglu(calls, x: x, y: y) {
            // A failed GPU call is computed on the CPU: CheckedExpertCompute compares only the first calls.
            Log.warning("Metal expert compute: \(problem); this call ran on the CPU")
            fallback.swiglu(calls, x: x, y: y)
        }
    }

    /// nil when done; else what went wrong (y is then left to the fallback).
    private func gpuSwiglu(_ calls: [ExpertCall], x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) -> String? {
        guard let first = calls.first else { return nil }
        let hidden = first.weights.hidden
        let totalRows = calls.map { $0.firstRow + $0.rows }.max() ?? 0
        let scratchFloats = calls.reduce(0) { $0 + 2 * $1.rows * $1.weights.intermediate }
        guard let xs = device.makeBuffer(bytes: x, length: totalRows * hidden * 4, options: .storageModeShared),
            let ys = device.makeBuffer(length: totalRows * hidden * 4, options: .storageModeShared),
            let scratch = device.makeBuffer(length: max(4, scratchFloats * 4), options: .storageModeShared),
            let commands = queue.makeCommandBuffer(), let encoder = commands.makeComputeCommandEncoder()
        else { return "Metal could not allocate a call's buffers" }
        var offset = 0  // floats into scratch
        for call in calls {
            let i = call.weights.intermediate
            let gate = (scratch, offset * 4)
            let up = (scratch, (offset + call.rows * i) * 4)
            offset += 2 * call.rows * i
            let rowsIn = (xs, call.firstRow * hidden * 4)
            let rowsOut = (ys, call.firstRow * hidden * 4)
            guard encode(encoder, call.weights.gate, x: rowsIn, y: gate, rows: call.rows),
                encode(encoder, call.weights.up, x: rowsIn, y: up, rows: call.rows)
            else {
                encoder.endEncoding()
                return "a weight lies outside the mapped cache"
            }
            var count = UInt32(call.rows * i)
            encoder.setComputePipelineState(siluMultiply)
            encoder.setBuffer(gate.0, offset: gate.1, index: 0)
            encoder.setBuffer(up.0, offset: up.1, index: 1)
            encoder.setBytes(&count, length: 4, index: 2)
            encoder.dispatchThreads(
                MTLSize(width: Int(count), height: 1, depth: 1),
                threadsPerThreadgroup: MTLSize(width: min(Int(count), siluMultiply.maxTotalThreadsPerThreadgroup), height: 1, depth: 1))
            guard encode(encoder, call.weights.down, x: gate, y: rowsOut, rows: call.rows) else {
                encoder.endEncoding()
                return "a weight lies outside the mapped cache"
            }
        }
        encoder.endEncoding()
        commands.commit()
        commands.waitUntilCompleted()
        guard commands.status == .completed else {
            return "the GPU failed a call: \(commands.error.map { "\($0)" } ?? "no error given")"
        }
        y.update(from: ys.contents().assumingMemoryBound(to: Float.self), count: totalRows * hidden)
        return nil
    }

    /// y [rows, N] = x [rows, K] @ W^T for one weight matrix, W read in place from the cache.
    private func encode(
        _ encoder: any MTLComputeCommandEncoder, _ matrix: WeightMatrix, x: (any MTLBuffer, Int), y: (any MTLBuffer, Int),
        rows: Int
    ) -> Bool {
        var params = Params(rows: UInt32(rows), outDim: UInt32(matrix.rows), inDim: UInt32(matrix.cols), bits: 0, groupSize: 1)
        let pipeline: any MTLComputePipelineState
        encoder.setBuffer(x.0, offset: x.1, index: 0)
        switch matrix {
        case let .float32(w, r, c):
            guard let weights = mapped(w, bytes: r * c * 4) else { return false }
            pipeline = dense
            encoder.setBuffer(weights.0, offset: weights.1, index: 1)
            encoder.setBuffer(y.0, offset: y.1, index: 2)
            encoder.setBytes(&params, length: MemoryLayout<Params>.stride, index: 3)
        case let .affine(words, scales, biases, r, c, bits, group):
            guard let w = mapped(words, bytes: r * c * bits / 8), let s = mapped(scales, bytes: r * (c / group) * 4),
                let b = mapped(biases, bytes: r * (c / group) * 4)
            else { return false }
            pipeline = affine
            params.bits = UInt32(bits)
            params.groupSize = UInt32(group)
            encoder.setBuffer(w.0, offset: w.1, index: 1)
            encoder.setBuffer(s.0, offset: s.1, index: 2)
            encoder.setBuffer(b.0, offset: b.1, index: 3)
            encoder.setBuffer(y.0, offset: y.1, index: 4)
            encoder.setBytes(&params, length: MemoryLayout<Params>.stride, index: 5)
        }
        encoder.setComputePipelineState(pipeline)
        let width = min(matrix.rows, pipeline.maxTotalThreadsPerThreadgroup)
        encoder.dispatchThreads(
            MTLSize(width: matrix.rows, height: rows, depth: 1), threadsPerThreadgroup: MTLSize(width: width, height: 1, depth: 1))
        return true
    }

    /// The mapped buffer and byte offset holding `bytes` bytes at `pointer`, or nil.
    private func mapped<T>(_ pointer: UnsafePointer<T>, bytes: Int) -> (any MTLBuffer, Int)? {
        let address = UInt(bitPattern: pointer)
        guard let region = regions.last(where: { $0.start <= address }),
            Int(address - region.start) + bytes <= region.count
        else { return nil }
        return (region.buffer, Int(address - region.start))
    }
}
#endif
