// TYPE-CHECK STUB, not UIKit: what the app uses, transcribed from Apple's documentation.
public struct UIBackgroundTaskIdentifier: Sendable { public static let invalid = UIBackgroundTaskIdentifier() }
@MainActor public final class UIApplication {
    public static let shared = UIApplication()
    public var isIdleTimerDisabled = false
    public func beginBackgroundTask(withName taskName: String?, expirationHandler handler: (@MainActor @Sendable () -> Void)?)
        -> UIBackgroundTaskIdentifier { .invalid }
    public func endBackgroundTask(_ identifier: UIBackgroundTaskIdentifier) {}
}
@MainActor public final class UIDevice {
    public static let current = UIDevice()
    public var name: String { "iPhone" }
}
@MainActor public final class UIPasteboard {
    public static let general = UIPasteboard()
    public var string: String?
}

import Foundation

// Foundation on Apple platforms has these; Linux's Foundation does not (stubbed here for the app's use).
extension URL {
    public func startAccessingSecurityScopedResource() -> Bool { false }
    public func stopAccessingSecurityScopedResource() {}
}
