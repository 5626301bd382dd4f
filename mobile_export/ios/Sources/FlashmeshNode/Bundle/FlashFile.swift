#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Opening record files around the page cache and reading them with `pread`.
enum FlashFile {
    #if os(Linux) && arch(x86_64)
    static let directFlag: Int32 = 0o40000  // O_DIRECT (Swift's Glibc does not export it)
    #elseif os(Linux) && arch(arm64)
    static let directFlag: Int32 = 0o200000
    #else
    static let directFlag: Int32 = 0
    #endif

    /// Opens `path` read-only; with `bypassingCache`, around the page cache where the OS and filesystem
    /// allow it (tmpfs refuses O_DIRECT: then through the cache, with a warning).
    static func open(_ path: String, bypassingCache: Bool) -> (fd: Int32?, bypassing: Bool, errno: Int32) {
        #if canImport(Darwin)
        let fd = Darwin.open(path, O_RDONLY)
        guard fd >= 0 else { return (nil, false, errno) }
        if bypassingCache && fcntl(fd, F_NOCACHE, 1) == 0 { return (fd, true, 0) }
        return (fd, false, 0)
        #else
        if bypassingCache && directFlag != 0 {
            let fd = Glibc.open(path, O_RDONLY | directFlag)
            if fd >= 0 { return (fd, true, 0) }
            Log.warning("\(path): filesystem refuses O_DIRECT; reading through the page cache")
        }
        let fd = Glibc.open(path, O_RDONLY)
        return fd >= 0 ? (fd, false, 0) : (nil, false, errno)
        #endif
    }

    static func close(_ fd: Int32) {
        #if canImport(Darwin)
        _ = Darwin.close(fd)
        #else
        _ = Glibc.close(fd)
        #endif
    }

    /// Reads `count` bytes at `offset` (retrying short reads until end of file); returns the bytes
    /// read, or -errno.
    static func readFully(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int, at offset: Int) -> Int {
        var done = 0
        while done < count {
            let got = pread(fd, buffer + done, count - done, off_t(offset + done))
            if got < 0 {
                if errno == EINTR { continue }
                return -Int(errno)
            }
            if got == 0 { break }
            done += got
        }
        return done
    }
}
