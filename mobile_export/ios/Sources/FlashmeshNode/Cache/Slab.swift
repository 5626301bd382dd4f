#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The cache's memory for experts of one shape: per tensor one buffer of `slots` experts, allocated
/// and written when the cache is made, so the budget is the memory (node/slab.py). Free slots are
/// handed out and taken back.
public final class Slab: @unchecked Sendable {
    public let tensors: [RAMTensor]
    public let slots: Int
    /// Experts of every layer sharing this slab: `slots >= experts` means nothing is ever evicted from it.
    public let experts: Int
    private let buffers: [AlignedBuffer]
    private var free: [Int]

    init(tensors: [RAMTensor], slots: Int, experts: Int) {
        self.tensors = tensors
        self.slots = slots
        self.experts = experts
        buffers = tensors.map { tensor in
            let buffer = AlignedBuffer(capacity: max(1, slots * tensor.nbytes))
            memset(buffer.pointer, 0, buffer.capacity)  // resident now, as the Python node's slabs are
            return buffer
        }
        free = Array((0..<slots).reversed())
    }

    public var freeSlots: Int { free.count }

    /// The slab's memory, one 16 KiB-aligned region per tensor (what a GPU backend maps).
    public var regions: [UnsafeRawBufferPointer] {
        buffers.map { UnsafeRawBufferPointer(start: $0.pointer, count: $0.capacity) }
    }

    func take() -> Int { free.removeLast() }

    func giveBack(_ slot: Int) { free.append(slot) }

    /// Tensor `index` (in `tensors` order) of the expert in `slot`.
    public func pointer(tensor index: Int, slot: Int) -> UnsafeMutableRawPointer {
        buffers[index].pointer + slot * tensors[index].nbytes
    }
}
