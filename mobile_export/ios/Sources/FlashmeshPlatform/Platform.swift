import FlashmeshNode
import Foundation

#if os(iOS)
import os
#endif

/// Which processor computes the experts (`flashmesh-node --compute`, the app uses `auto`).
public enum ComputePreference: String, CaseIterable, Sendable {
    case auto, cpu, gpu
}

/// The one place the expert compute is chosen. `auto`: the GPU through our own Metal kernels where
/// there is a Metal device (every iPhone and Apple-silicon Mac), checked against the CPU on the first
/// call of each expert shape and dropped for the CPU if they disagree; else the CPU (OpenBLAS here,
/// Accelerate on Apple platforms). Why Metal kernels of our own rather than mlx-swift or the bundle's
/// Core ML kernel: docs/ios.md, "Expert compute on the phone's GPU".
public enum ExpertComputeChoice {
    public static func make(_ preference: ComputePreference) throws(UserError) -> any ExpertCompute {
        if preference == .cpu { return CPUExpertCompute() }
        #if canImport(Metal)
        if let gpu = try MetalExpertCompute() { return CheckedExpertCompute(gpu) }
        #endif
        if preference == .gpu { throw UserError("no Metal GPU here; use --compute cpu (or auto)") }
        return CPUExpertCompute()
    }
}

extension NodePlatform {
    /// This platform's advertiser (Bonjour where dns_sd exists), compute (`ExpertComputeChoice`) and
    /// memory limit, with the transport given (FlashmeshGRPC's `GRPCCoreTransport`; the app compiles it itself).
    public static func current(
        transport: @escaping @Sendable () -> any NodeTransport, compute preference: ComputePreference = .auto
    ) -> NodePlatform {
        NodePlatform(
            makeTransport: transport,
            makeAdvertiser: { advertiser() },
            makeCompute: {
                do {
                    return try ExpertComputeChoice.make(preference)
                } catch {
                    Log.warning("\(error); computing on the CPU")
                    return CPUExpertCompute()
                }
            },
            availableMemory: { availableMemory() })
    }

    /// Bonjour's advertiser on Apple platforms; none on Linux (docs/swift-node.md, "Discovery").
    public static func advertiser() -> (any NodeAdvertiser)? {
        #if canImport(dnssd) && canImport(Darwin)
        return BonjourAdvertiser()
        #else
        return nil
        #endif
    }

    /// Bytes this process may still allocate: iOS's per-app limit (raised by the
    /// increased-memory-limit entitlement), else the memory the system reports free.
    public static func availableMemory() -> Int {
        #if os(iOS)
        return Int(os_proc_available_memory())
        #elseif os(Linux)
        let meminfo = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
        let line = meminfo.split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }
        let kib = line?.split(separator: " ").dropFirst().first.flatMap { Int($0) }
        return (kib ?? 0) * 1024
        #else
        return Int(ProcessInfo.processInfo.physicalMemory / 2)  // macOS: no per-process limit; half the RAM
        #endif
    }
}
