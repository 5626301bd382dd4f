// TYPE-CHECK STUB, not Metal: the declarations MetalExpertCompute uses, transcribed from Apple's Metal
// documentation (Swift signatures), with no implementation. Checks our calls against that transcription.
public struct MTLSize {
    public var width: Int, height: Int, depth: Int
    public init(width: Int, height: Int, depth: Int) { (self.width, self.height, self.depth) = (width, height, depth) }
}
public struct MTLResourceOptions: OptionSet, Sendable {
    public let rawValue: UInt
    public init(rawValue: UInt) { self.rawValue = rawValue }
    public static var storageModeShared: MTLResourceOptions { MTLResourceOptions(rawValue: 0) }  // 0 in Metal too
}
public enum MTLCommandBufferStatus: UInt { case notEnqueued, enqueued, committed, scheduled, completed, error }
public class MTLCompileOptions {}
public protocol MTLFunction {}
public protocol MTLLibrary { func makeFunction(name: String) -> (any MTLFunction)? }
public protocol MTLComputePipelineState { var maxTotalThreadsPerThreadgroup: Int { get } }
public protocol MTLBuffer { var length: Int { get }; func contents() -> UnsafeMutableRawPointer }
public protocol MTLCommandEncoder { func endEncoding() }
public protocol MTLComputeCommandEncoder: MTLCommandEncoder {
    func setComputePipelineState(_ state: any MTLComputePipelineState)
    func setBuffer(_ buffer: (any MTLBuffer)?, offset: Int, index: Int)
    func setBytes(_ bytes: UnsafeRawPointer, length: Int, index: Int)
    func dispatchThreads(_ threadsPerGrid: MTLSize, threadsPerThreadgroup: MTLSize)
}
public protocol MTLCommandBuffer {
    func makeComputeCommandEncoder() -> (any MTLComputeCommandEncoder)?
    func commit()
    func waitUntilCompleted()
    var status: MTLCommandBufferStatus { get }
    var error: (any Error)? { get }
}
public protocol MTLCommandQueue { func makeCommandBuffer() -> (any MTLCommandBuffer)? }
public protocol MTLDevice {
    var name: String { get }
    func makeCommandQueue() -> (any MTLCommandQueue)?
    func makeLibrary(source: String, options: MTLCompileOptions?) throws -> any MTLLibrary
    func makeComputePipelineState(function: any MTLFunction) throws -> any MTLComputePipelineState
    func makeBuffer(length: Int, options: MTLResourceOptions) -> (any MTLBuffer)?
    func makeBuffer(bytes pointer: UnsafeRawPointer, length: Int, options: MTLResourceOptions) -> (any MTLBuffer)?
    func makeBuffer(
        bytesNoCopy pointer: UnsafeMutableRawPointer, length: Int, options: MTLResourceOptions,
        deallocator: ((UnsafeMutableRawPointer, Int) -> Void)?
    ) -> (any MTLBuffer)?
}
public func MTLCreateSystemDefaultDevice() -> (any MTLDevice)? { nil }
