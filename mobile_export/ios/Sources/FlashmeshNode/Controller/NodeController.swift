import Foundation
import Observation

/// Where the node is: not serving, starting (opening the share, allocating the cache), serving, stopping.
public enum NodePhase: Equatable, Sendable {
    case idle, starting, stopping
    case serving(ServingInfo)
}

/// The app's model of the node (a SwiftUI view observes it; no node logic lives in views): the chosen
/// bundle and share, the budget within what the device allows, start/stop, the app going to the
/// background and back, and the live statistics. Operations run one after another in call order.
@MainActor @Observable
public final class NodeController {
    public static let backgroundNotice =
        "Stopped: the app went to the background (a phone serves only in the foreground). Coordinators "
        + "move its experts to replicas, if any. Serving resumes when the app is open again."

    public var settings: ServeSettings
    public private(set) var bundle: BundleSummary?
    public private(set) var bounds: BudgetBounds?
    public private(set) var phase = NodePhase.idle
    /// One line for the user: the last error, or why serving stopped.
    public private(set) var notice: String?
    public private(set) var stats: StatsDisplay?

    @ObservationIgnored private let platform: NodePlatform
    @ObservationIgnored private var running: RunningNode?
    @ObservationIgnored private var previousSample: StatsSample?
    @ObservationIgnored private var resumeOnForeground = false
    @ObservationIgnored private var queue: Task<Void, Never>?
    @ObservationIgnored private var polling: Task<Void, Never>?
    @ObservationIgnored public var statsInterval: Duration = .seconds(1)

    public init(platform: NodePlatform, settings: ServeSettings) {
        self.platform = platform
        self.settings = settings
    }

    public var isServing: Bool {
        if case .serving = phase { return true }
        return false
    }

    /// While serving (and while starting), the screen must not lock: the app would go to the background.
    public var keepsScreenAwake: Bool { isServing || phase == .starting }

    /// Settings and bundle can change only while not serving.
    public var canEdit: Bool { phase == .idle }

    public var canStart: Bool {
        phase == .idle && bundle != nil && !settings.token.isEmpty && (bounds?.isPossible ?? false)
    }

    /// The budget a start would use: the setting within the bounds (0: the largest allowed).
    public var effectiveBudget: Int {
        guard let bounds else { return 0 }
        return settings.budgetBytes == 0 ? bounds.suggested : bounds.clamp(settings.budgetBytes)
    }

    // MARK: - choosing what to serve

    /// Opens the bundle at `path` with the settings' share; an unusable one leaves a notice.
    public func openBundle(_ path: String) async {
        await serially { await self.load(path) }
    }

    /// Serve share `index` of `count` (each expert on `replicas` of the shares); count 1: everything.
    public func setShare(count: Int, index: Int, replicas: Int = 1) async {
        await serially {
            guard self.canEdit else { return }
            self.settings.shareCount = max(1, count)
            self.settings.shareIndex = min(max(0, index), max(1, count) - 1)
            self.settings.replicas = min(max(1, replicas), max(1, count))
            if let path = self.bundle?.path { await self.load(path) }
        }
    }

    public func setBudget(_ bytes: Int) {
        guard canEdit, let bounds else { return }
        settings.budgetBytes = bounds.clamp(bytes)
    }

    /// Joins a cluster made by `flashmesh cluster init`: reads the join file `flashmesh cluster add-node
    /// NAME` wrote, installs its identity into `directory` (the app's own storage) and takes its token and
    /// name, so the node serves only mutual TLS from then on. A damaged or foreign file leaves a notice
    /// and the settings as they were.
    public func importJoinFile(_ path: String, keepIn directory: String) async {
        await serially {
            guard self.canEdit else { return }
            let result = await Task.detached { () -> Result<(JoinFile, String), UserError> in
                Result { () throws(UserError) in
                    let join = try JoinFile.read(path)
                    return (join, try join.install(into: directory))
                }
            }.value
            switch result {
            case let .success((join, installed)):
                self.settings.token = join.config.token
                self.settings.name = join.identity.name
                self.settings.tls = installed
                self.notice = "joined the cluster as \(join.identity.name): mutual TLS, certificate valid until "
                    + CivilDate.format(join.identity.notAfter, time: false)
            case let .failure(error):
                self.notice = error.description
            }
        }
    }

    /// Serve in plaintext again (the cluster token only), forgetting the joined identity.
    public func leaveCluster() {
        guard canEdit else { return }
        settings.tls = nil
    }

    public func generateToken() {
        guard canEdit else { return }
        settings.token = ClusterToken.generate()
    }

    // MARK: - serving

    public func start() async {
        await serially { await self.startNow() }
    }

    public func stop() async {
        await serially {
            self.resumeOnForeground = false
            await self.stopNow(notice: nil)
        }
    }

    /// The app left the foreground: stop serving (and resume when it returns).
    public func enterBackground() async {
        await serially {
            guard self.isServing || self.phase == .starting else { return }
            self.resumeOnForeground = true
            await self.stopNow(notice: NodeController.backgroundNotice)
        }
    }

    public func enterForeground() async {
        await serially {
            guard self.resumeOnForeground else { return }
            self.resumeOnForeground = false
            await self.startNow()
        }
    }

    /// Reads the node's counters into `stats` (the controller does so every `statsInterval` while serving).
    public func refreshStats() {
        guard let running else { return }
        let sample = StatsSample(running.service.stats(), latency: running.latency.summary(), at: monotonicSeconds())
        stats = StatsDisplay(sample, previous: previousSample)
        previousSample = sample
    }

    // MARK: - internals

    private func serially(_ operation: @escaping @MainActor () async -> Void) async {
        let previous = queue
        let task = Task { @MainActor in
            await previous?.value
            await operation()
        }
        queue = task
        await task.value
    }

    private func load(_ path: String) async {
        guard canEdit else { return }
        let settings = self.settings
        let available = platform.availableMemory()
        let opened = await Task.detached { () -> Result<BundleSummary, UserError> in
            Result { () throws(UserError) in BundleSummary(try ExpertBundle.open(path, shard: try settings.shard())) }
        }.value
        switch opened {
        case let .success(summary):
            bundle = summary
            let bounds = BudgetBounds(summary: summary, availableBytes: available)
            self.bounds = bounds
            notice = bounds.problem(available: available)
        case let .failure(error):
            bundle = nil
            bounds = nil
            notice = error.description
        }
    }

    private func startNow() async {
        guard canStart, let path = bundle?.path else {
            if phase == .idle, settings.token.isEmpty, bundle != nil { notice = "enter the cluster token first" }
            return
        }
        phase = .starting
        notice = nil
        let (settings, budget, platform) = (self.settings, effectiveBudget, self.platform)
        let started = await Task.detached { () -> Result<RunningNode, UserError> in
            Result { () throws(UserError) in try RunningNode.start(path: path, settings: settings, budget: budget, platform: platform) }
        }.value
        switch started {
        case let .success(node):
            running = node
            previousSample = nil
            phase = .serving(node.info)
            refreshStats()
            startPolling()
        case let .failure(error):
            phase = .idle
            notice = error.description
        }
    }

    private func stopNow(notice: String?) async {
        guard let node = running else { return }
        phase = .stopping
        polling?.cancel()
        polling = nil
        refreshStats()  // the last figures stay on screen
        running = nil
        await Task.detached { node.stop() }.value
        phase = .idle
        self.notice = notice
    }

    private func startPolling() {
        polling = Task { @MainActor [weak self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: self?.statsInterval ?? .seconds(1))
                guard let self, !Task.isCancelled else { return }
                self.refreshStats()
            }
        }
    }
}
