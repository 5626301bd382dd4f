import XCTest

@testable import FlashmeshNode

/// A transport that hands calls to the test instead of a network.
final class DirectTransport: NodeTransport, @unchecked Sendable {
    let state = Locked<(handler: (@Sendable (RPCCall) -> RPCReply)?, starts: Int, stops: Int)>((nil, 0, 0))
    let tlsUsed = Locked<TLSIdentity?>(nil)

    func start(
        host: String, port: Int, maxMessageBytes: Int, tls: TLSIdentity?, handler: @escaping @Sendable (RPCCall) -> RPCReply
    ) throws(UserError) -> Int {
        state.withLock { $0 = (handler, $0.starts + 1, $0.stops) }
        tlsUsed.withLock { $0 = tls }
        return 40_000 + state.withLock { $0.starts }
    }

    func stop(grace: Double) {
        state.withLock { $0 = (nil, $0.starts, $0.stops + 1) }
    }

    func call(_ method: String, _ request: [UInt8], token: String) -> RPCReply? {
        state.withLock { $0.handler }.map { $0(RPCCall(method: "/flashmesh.v1.Node/\(method)", token: token, request: request)) }
    }
}

final class RecordingAdvertiser: NodeAdvertiser, @unchecked Sendable {
    let log = Locked<[String]>([])
    let current = Locked<Advertisement?>(nil)

    func advertise(_ advertisement: Advertisement, scope: AdvertiseScope) throws(UserError) {
        log.withLock { $0.append("advertise \(advertisement.instanceName) \(scope)") }
        current.withLock { $0 = advertisement }
    }

    func withdraw() {
        log.withLock { $0.append("withdraw") }
        current.withLock { $0 = nil }
    }
}

/// A controller on a real bundle and service with a transport and advertiser the test drives.
@MainActor
func makeTestController(available: Int = 64 << 30) -> (NodeController, DirectTransport, RecordingAdvertiser) {
    let transport = DirectTransport()
    let advertiser = RecordingAdvertiser()
    let platform = NodePlatform(
        makeTransport: { transport }, makeAdvertiser: { advertiser }, makeCompute: { CPUExpertCompute() },
        availableMemory: { available })
    var settings = ServeSettings(name: "Test iPhone")
    settings.host = "0.0.0.0"
    return (NodeController(platform: platform, settings: settings), transport, advertiser)
}

/// The app's state machine (NodeController), on a real bundle and service, without a network.
@MainActor
final class ControllerTests: XCTestCase {
    func makeController(available: Int = 64 << 30) -> (NodeController, DirectTransport, RecordingAdvertiser) {
        makeTestController(available: available)
    }

    func testStartServeBackgroundForegroundStop() async throws {
        let v = try loadVectors()
        let entry = try XCTUnwrap(v.pairs.first { $0.bundle == "qwen3_moe-fp16.flashmesh-ios" })
        let (controller, transport, advertiser) = makeController()
        XCTAssertFalse(controller.canStart)
        await controller.openBundle(Vectors.path(entry.bundle))
        let summary = try XCTUnwrap(controller.bundle, controller.notice ?? "")
        XCTAssertEqual(controller.effectiveBudget, summary.heldBytes)
        XCTAssertFalse(controller.canStart)  // no token yet
        await controller.start()
        XCTAssertEqual(controller.notice, "enter the cluster token first")
        controller.generateToken()
        XCTAssertEqual(controller.settings.token.count, 24)
        XCTAssertTrue(controller.canStart)
        XCTAssertFalse(controller.keepsScreenAwake)

        await controller.start()
        guard case let .serving(info) = controller.phase else { return XCTFail("not serving: \(controller.notice ?? "")") }
        XCTAssertTrue(controller.keepsScreenAwake)
        XCTAssertFalse(controller.canEdit)
        XCTAssertEqual(info.expertsHeld, summary.expertsTotal)
        XCTAssertEqual(info.compute, CPUExpertCompute().name)
        let ad = try XCTUnwrap(advertiser.current.withLock { $0 })
        XCTAssertEqual(ad.port, info.port)
        XCTAssertEqual(ad.nodeId, info.nodeId)
        XCTAssertEqual(ad.fingerprint, summary.fingerprint)
        XCTAssertEqual(advertiser.log.withLock { $0 }, ["advertise \(ad.instanceName) everyInterface"])

        // A call through the transport reaches the node; the statistics count it.
        let token = controller.settings.token
        let request = try Vectors.bytes(entry.request)
        guard case .message = transport.call("Compute", request, token: token) else { return XCTFail("Compute failed") }
        guard case .failure(.unauthenticated, _, _) = transport.call("Info", [], token: "wrong") else {
            return XCTFail("a wrong token was accepted")
        }
        controller.refreshStats()
        let stats = try XCTUnwrap(controller.stats)
        XCTAssertEqual(stats.requests, "1")
        XCTAssertEqual(stats.rejected, "1")
        XCTAssertNotEqual(stats.latency, "-")

        // Background: serving stops (advertisement withdrawn, transport stopped), with a clear notice.
        await controller.enterBackground()
        XCTAssertEqual(controller.phase, .idle)
        XCTAssertEqual(controller.notice, NodeController.backgroundNotice)
        XCTAssertFalse(controller.keepsScreenAwake)
        XCTAssertNil(advertiser.current.withLock { $0 })
        XCTAssertEqual(transport.state.withLock { $0.stops }, 1)
        XCTAssertNil(transport.call("Health", [], token: token))

        // Foreground: serving resumes as a new node (the coordinator treats it as one that joined).
        await controller.enterForeground()
        guard case let .serving(again) = controller.phase else { return XCTFail("did not resume") }
        XCTAssertNotEqual(again.nodeId, info.nodeId)
        XCTAssertNil(controller.notice)

        // Stop by hand: nothing resumes on the next foreground.
        await controller.stop()
        XCTAssertEqual(controller.phase, .idle)
        await controller.enterBackground()
        await controller.enterForeground()
        XCTAssertEqual(controller.phase, .idle)
        XCTAssertEqual(transport.state.withLock { ($0.starts, $0.stops) }.0, 2)
    }

    func testOperationsRunInCallOrder() async throws {
        let v = try loadVectors()
        let (controller, _, _) = makeController()
        await controller.openBundle(Vectors.path(v.manifests[0].bundle))
        controller.generateToken()
        // Background arrives once the start has begun (still allocating the cache): it stops after the
        // start. Two `async let`s would race to the controller; the start is made to come first.
        let started = Task { await controller.start() }
        let deadline = Date().addingTimeInterval(30)
        while controller.phase == .idle, Date() < deadline { await Task.yield() }
        XCTAssertNotEqual(controller.phase, .idle, "the start never began")
        await controller.enterBackground()
        await started.value
        XCTAssertEqual(controller.phase, .idle)
        XCTAssertEqual(controller.notice, NodeController.backgroundNotice)
    }

    func testShareBudgetAndRefusals() async throws {
        let v = try loadVectors()
        let path = Vectors.path(v.manifests[0].bundle)
        let (controller, _, _) = makeController()
        await controller.openBundle(path)
        let whole = try XCTUnwrap(controller.bundle)
        await controller.setShare(count: 2, index: 5)  // the index is clamped into the share count
        XCTAssertEqual(controller.settings.shareIndex, 1)
        let half = try XCTUnwrap(controller.bundle)
        XCTAssertLessThan(half.expertsHeld, whole.expertsHeld)
        controller.setBudget(1)
        XCTAssertEqual(controller.effectiveBudget, half.minimumBudget)

        await controller.openBundle("/nonexistent.flashmesh-ios")
        XCTAssertNil(controller.bundle)
        XCTAssertTrue(controller.notice?.contains("not a flashmesh iOS bundle") ?? false, controller.notice ?? "")

        let (small, _, _) = makeController(available: 100 << 20)
        await small.openBundle(path)
        small.generateToken()
        XCTAssertFalse(small.canStart)
        XCTAssertTrue(small.notice?.contains("this device has") ?? false, small.notice ?? "")
    }
}
