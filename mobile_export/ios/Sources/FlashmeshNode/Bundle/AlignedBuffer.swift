import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Memory aligned to 16 KiB (the record alignment and iOS page size; O_DIRECT needs at least the
/// logical block), owned by this object.
public final class AlignedBuffer: @unchecked Sendable {
    public static let alignment = 16 * 1024
    public let pointer: UnsafeMutableRawPointer
    public let capacity: Int

    public init(capacity: Int) {
        var raw: UnsafeMutableRawPointer?
        let rounded = max(Self.alignment, (capacity + Self.alignment - 1) / Self.alignment * Self.alignment)
        guard posix_memalign(&raw, Self.alignment, rounded) == 0, let raw else {
            fatalError("out of memory allocating a \(rounded)-byte record buffer")
        }
        pointer = raw
        self.capacity = rounded
    }

    public func bytes(_ count: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: pointer, count: min(count, capacity))
    }

    deinit {
        free(pointer)
    }
}

/// Record buffers kept for reuse, so that reads land in memory that is already mapped.
final class BufferPool: @unchecked Sendable {
    private let kept = Locked<[AlignedBuffer]>([])
    private let keep: Int

    init(keep: Int) {
        self.keep = keep
    }

    func take(_ size: Int) -> AlignedBuffer {
        let reused = kept.withLock { buffers -> AlignedBuffer? in
            guard let i = buffers.firstIndex(where: { $0.capacity >= size }) else { return nil }
            return buffers.remove(at: i)
        }
        return reused ?? AlignedBuffer(capacity: size)
    }

    func give(_ buffer: AlignedBuffer) {
        kept.withLock { buffers in
            if buffers.count < keep { buffers.append(buffer) }
        }
    }
}
