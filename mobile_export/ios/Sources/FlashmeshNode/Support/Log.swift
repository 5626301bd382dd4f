import Foundation

/// Warnings and information on standard error, one line each (the Python node's `logging`).
public enum Log {
    public static func warning(_ message: String) {
        write("WARNING", message)
    }

    public static func info(_ message: String) {
        write("INFO", message)
    }

    private static func write(_ level: String, _ message: String) {
        FileHandle.standardError.write(Data("\(level) flashmesh-node: \(message)\n".utf8))
    }
}
