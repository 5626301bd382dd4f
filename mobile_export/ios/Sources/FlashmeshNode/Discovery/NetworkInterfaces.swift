#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The machine's IPv4 interfaces (getifaddrs): which one holds an address, and the addresses to show.
public enum NetworkInterfaces {
    /// (interface name, dotted IPv4 address) of every interface that is up, loopback last.
    public static func ipv4Addresses() -> [(interface: String, address: String)] {
        var found: [(String, String, Bool)] = []
        var list: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&list) == 0, let first = list else { return [] }
        defer { freeifaddrs(list) }
        var next: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = next {
            next = entry.pointee.ifa_next
            let flags = Int32(entry.pointee.ifa_flags)
            guard let addr = entry.pointee.ifa_addr, Int32(addr.pointee.sa_family) == AF_INET, flags & Int32(IFF_UP) != 0
            else { continue }
            var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
            let ok = addr.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                withUnsafePointer(to: sin.pointee.sin_addr) { inet_ntop(AF_INET, $0, &text, socklen_t(text.count)) != nil }
            }
            guard ok else { continue }
            let name = String(cString: entry.pointee.ifa_name)
            found.append((name, String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self),
                          flags & Int32(IFF_LOOPBACK) != 0))
        }
        return found.filter { !$0.2 }.map { ($0.0, $0.1) } + found.filter { $0.2 }.map { ($0.0, $0.1) }
    }

    /// The index (if_nametoindex) of the interface holding IPv4 `address`, or nil.
    public static func index(holding address: String) -> UInt32? {
        guard let entry = ipv4Addresses().first(where: { $0.address == address }) else { return nil }
        let index = if_nametoindex(entry.interface)
        return index == 0 ? nil : index
    }
}
