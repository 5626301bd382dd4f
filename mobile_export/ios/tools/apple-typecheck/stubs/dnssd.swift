// TYPE-CHECK STUB, not dns_sd: the declarations BonjourAdvertiser uses, as Apple's documentation gives
// their Swift import (framework dnssd), with no implementation.
public typealias DNSServiceRef = OpaquePointer
public typealias DNSServiceFlags = UInt32
public typealias DNSServiceErrorType = Int32
public typealias DNSServiceRegisterReply = @convention(c) (
    DNSServiceRef?, DNSServiceFlags, DNSServiceErrorType, UnsafePointer<CChar>?, UnsafePointer<CChar>?,
    UnsafePointer<CChar>?, UnsafeMutableRawPointer?
) -> Void
public var kDNSServiceErr_NoError: Int { 0 }
public func DNSServiceRegister(
    _ sdRef: UnsafeMutablePointer<DNSServiceRef?>!, _ flags: DNSServiceFlags, _ interfaceIndex: UInt32,
    _ name: UnsafePointer<CChar>!, _ regtype: UnsafePointer<CChar>!, _ domain: UnsafePointer<CChar>!,
    _ host: UnsafePointer<CChar>!, _ port: UInt16, _ txtLen: UInt16, _ txtRecord: UnsafeRawPointer!,
    _ callBack: DNSServiceRegisterReply!, _ context: UnsafeMutableRawPointer!
) -> DNSServiceErrorType { 0 }
public func DNSServiceRefSockFD(_ sdRef: DNSServiceRef!) -> Int32 { -1 }
public func DNSServiceProcessResult(_ sdRef: DNSServiceRef!) -> DNSServiceErrorType { 0 }
public func DNSServiceRefDeallocate(_ sdRef: DNSServiceRef!) {}
