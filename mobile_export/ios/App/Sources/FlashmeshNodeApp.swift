// The iOS app: a thin shell over FlashmeshNode's NodeController (docs/ios.md). Everything the node
// does is in the library; this file wires the platform (UIKit's idle timer, scene phases) to it.
// NOT BUILT on the Linux machines it was written on; tools/apple-typecheck type-checks it against stubs.
import FlashmeshNode
import Foundation
import FlashmeshPlatform
import SwiftUI
import UIKit

@main
struct FlashmeshNodeApp: App {
    @State private var controller = NodeController(
        platform: .current(transport: { GRPCCoreTransport() }), settings: SavedSettings.load())
    @Environment(\.scenePhase) private var scenePhase

    var body: some Scene {
        WindowGroup {
            NodeScreen(controller: controller)
                .onChange(of: scenePhase) { _, phase in follow(phase) }
                .onChange(of: controller.keepsScreenAwake) { _, awake in
                    UIApplication.shared.isIdleTimerDisabled = awake  // a locked screen sends the app to the background
                }
                .onChange(of: controller.settings) { _, settings in SavedSettings.save(settings) }
        }
    }

    /// A phone node serves in the foreground only: leaving it stops serving (iOS grants a few seconds
    /// to finish the calls in flight), coming back resumes.
    private func follow(_ phase: ScenePhase) {
        switch phase {
        case .background:
            let task = UIApplication.shared.beginBackgroundTask(withName: "flashmesh-stop", expirationHandler: nil)
            Task {
                await controller.enterBackground()
                UIApplication.shared.endBackgroundTask(task)
            }
        case .active:
            Task { await controller.enterForeground() }
        default:
            break
        }
    }
}

/// The settings between launches (token, name, share, budget), in the app's own defaults.
@MainActor
enum SavedSettings {
    private static let key = "flashmesh.settings"

    static func load() -> ServeSettings {
        if let data = UserDefaults.standard.data(forKey: key),
            var saved = try? JSONDecoder().decode(ServeSettings.self, from: data)
        {
            // The app's container moves between installs: the joined identity is wherever it is now.
            saved.tls = saved.tls.map { _ in JoinFile.installedIdentity(in: NodeScreen.identityHome) }
            return saved
        }
        return ServeSettings(name: UIDevice.current.name)
    }

    static func save(_ settings: ServeSettings) {
        if let data = try? JSONEncoder().encode(settings) { UserDefaults.standard.set(data, forKey: key) }
    }
}
