/// A problem the user can fix (a bundle, an option, the budget), as protos/errors.py `UserError`:
/// `description` is one line that says what and how (the executable prints `error: ...`, exits 2).
public struct UserError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// One expert record that cannot be used: it was cut short or its checksum does not match.
/// Names its layer and expert, so a coordinator can compute that expert on a replica.
public struct RecordError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Reason: Equatable, Sendable {
        case shortRead(got: Int, expected: Int)
        case checksumMismatch(file: String)
        case unreadable(errno: Int32, file: String)
    }

    public let layer: Int
    public let expert: Int
    public let reason: Reason

    public init(layer: Int, expert: Int, reason: Reason) {
        self.layer = layer
        self.expert = expert
        self.reason = reason
    }

    public var description: String {
        let why: String
        switch reason {
        case let .shortRead(got, expected):
            why = "short read (\(got) of \(expected) bytes); the bundle file is truncated, re-copy or re-export the bundle"
        case let .checksumMismatch(file):
            why = "record checksum mismatch in \(file); the flash copy is corrupt, re-copy or re-export the bundle"
        case let .unreadable(code, file):
            why = "cannot read \(file) (\(systemMessage(code))); re-copy or re-export the bundle"
        }
        return "layer \(layer) expert \(expert): \(why)"
    }
}
