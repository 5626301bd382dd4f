#if canImport(dnssd)
import FlashmeshNode
import Foundation
import dnssd

#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc  // only for the type-check against avahi's copy of dns_sd.h (tools/apple-typecheck)
#endif

/// Advertises the node as `_flashmesh._tcp` through the system's mDNS responder (dns_sd's
/// DNSServiceRegister: libSystem on macOS and iOS), with the TXT record of node/advertise.py. Replies
/// (a registration refused later) are read on a thread of our own and logged. NOT RUN on the Linux
/// machines this was written on (docs/ios.md): iOS asks the user for Local Network access first.
public final class BonjourAdvertiser: NodeAdvertiser, @unchecked Sendable {
    private let state = Locked<(ref: DNSServiceRef?, thread: Thread?, stopping: Bool)>((nil, nil, false))

    public init() {}

    public func advertise(_ advertisement: Advertisement, scope: AdvertiseScope) throws(UserError) {
        withdraw()
        var ref: DNSServiceRef?
        let txt = advertisement.txtRecord
        let interface: UInt32
        switch scope {
        case .localOnly: interface = UInt32(bitPattern: -1)  // kDNSServiceInterfaceIndexLocalOnly
        case .everyInterface: interface = 0  // kDNSServiceInterfaceIndexAny
        case let .interface(index): interface = index
        }
        let error = txt.withUnsafeBytes { record in
            DNSServiceRegister(
                &ref, 0, interface, advertisement.instanceName, Advertisement.serviceType, nil, nil,
                UInt16(advertisement.port).bigEndian, UInt16(record.count), record.baseAddress,
                { _, _, code, name, _, _, _ in
                    if code != DNSServiceErrorType(kDNSServiceErr_NoError) {
                        Log.warning("Bonjour refused \(name.map { String(cString: $0) } ?? "the node"): dns_sd error \(code)")
                    }
                }, nil)
        }
        guard error == DNSServiceErrorType(kDNSServiceErr_NoError), let ref else {
            throw UserError(
                "Bonjour cannot advertise the node (dns_sd error \(error)); allow Local Network access in Settings, "
                    + "or give the coordinator --node ADDR:PORT")
        }
        let handle = ServiceHandle(ref: ref)
        let thread = Thread { [weak self] in self?.readReplies(handle) }
        thread.name = "flashmesh-bonjour"
        state.withLock { $0 = (ref, thread, false) }
        thread.start()
    }

    public func withdraw() {
        let (ref, thread) = state.withLock { s -> (DNSServiceRef?, Thread?) in
            s.stopping = true
            return (s.ref, s.thread)
        }
        guard let ref else { return }
        while thread?.isFinished == false { usleep(10_000) }  // the reader wakes within 0.2 s
        DNSServiceRefDeallocate(ref)
        state.withLock { $0 = (nil, nil, false) }
    }

    /// Hands the responder's replies to dns_sd (which calls the callback above) until withdrawn.
    private func readReplies(_ handle: ServiceHandle) {
        let fd = DNSServiceRefSockFD(handle.ref)
        guard fd >= 0 else { return }
        while !state.withLock({ $0.stopping }) {
            var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&ready, 1, 200) > 0 else { continue }
            if DNSServiceProcessResult(handle.ref) != DNSServiceErrorType(kDNSServiceErr_NoError) { return }
        }
    }
}

private struct ServiceHandle: @unchecked Sendable {
    let ref: DNSServiceRef
}
#endif
