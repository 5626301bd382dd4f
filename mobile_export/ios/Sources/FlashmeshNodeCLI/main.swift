// flashmesh-node: serves an iPhone bundle's experts over gRPC, as `flashmesh node serve --bundle` does.
import FlashmeshGRPC
import FlashmeshNode
import FlashmeshPlatform
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Runs until SIGTERM or SIGINT (or the parent process is gone), then drains and returns 0.
func serve(_ args: Arguments) throws(UserError) -> Int32 {
    let cluster = try ClusterSettings.resolve(args)  // certificates first: nothing opens with a bad identity
    let bundle = try ExpertBundle.open(args.bundle ?? "", shard: try args.shard())
    let token = cluster.token ?? ClusterToken.generate()
    var options = NodeService.Options(ramBudget: args.ramBudget ?? 0, token: token, name: cluster.name)
    options.pageCache = args.pageCache
    options.maxMessageBytes = args.maxMessage
    options.flashGBps = args.flashGBps
    let service = try NodeService(bundle: bundle, options: options, compute: try ExpertComputeChoice.make(args.compute))
    let transport = GRPCCoreTransport()
    let rpc = NodeRPC(node: service)
    let port: Int
    do {
        port = try transport.start(
            host: cluster.host, port: args.port, maxMessageBytes: options.maxMessageBytes, tls: cluster.tls
        ) {
            rpc.handle($0)
        }
    } catch {
        service.close()
        throw error
    }
    let info = service.info()
    let held = info.layers.reduce(0) { $0 + $1.experts.count }
    let total = info.layers.reduce(0) { $0 + Int($1.numExperts) }
    say(
        "node \(options.name) (\(service.nodeId)) serving \(held) of \(total) experts of model "
            + "\(info.fingerprint.prefix(16)) from bundle \(bundle.path) on \(cluster.host) port \(port)")
    if let tls = cluster.tls { say(tls.summary) }
    let advertiser = args.advertise ? NodePlatform.advertiser() : nil
    if let advertiser {
        do throws(UserError) {
            guard let scope = AdvertiseScope.matching(host: cluster.host) else {
                throw UserError("no interface holds \(cluster.host); give an address of this machine, 0.0.0.0 or 127.0.0.1")
            }
            let ad = Advertisement(name: options.name, nodeId: service.nodeId, fingerprint: info.fingerprint, port: port)
            try advertiser.advertise(ad, scope: scope)
        } catch {
            transport.stop(grace: 0)
            service.close()
            throw error
        }
    }
    if cluster.token == nil { say("cluster token: \(token)  (give it to the coordinator: --token or FLASHMESH_TOKEN)") }
    waitForStop(parentPid: args.parentPid)
    advertiser?.withdraw()
    transport.stop(grace: 1.0)
    service.close()
    return 0
}

func waitForStop(parentPid: Int32?) {
    let stop = DispatchSemaphore(value: 0)
    var sources: [DispatchSourceSignal] = []
    for sig in [SIGTERM, SIGINT] {
        signal(sig, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        source.setEventHandler { stop.signal() }
        source.resume()
        sources.append(source)
    }
    while stop.wait(timeout: .now() + 0.5) == .timedOut {
        if let parentPid, getppid() != parentPid {
            Log.warning("parent process \(parentPid) is gone; stopping")
            break
        }
    }
    sources.forEach { $0.cancel() }
}

/// One line on standard output, written at once (the tests read the start line from a pipe).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

do {
    let args = try Arguments.parse(Array(CommandLine.arguments.dropFirst()))
    if args.help {
        say(Arguments.usage)
        exit(0)
    }
    exit(try serve(args))
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(2)
}
