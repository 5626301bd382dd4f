import Foundation

/// A machine's cluster settings (node/cluster_config.py): `config.toml` in the config directory, as
/// `flashmesh cluster join` installs it, or inside a join file. Only what those write is read: keys
/// with a string or an array of strings as value (the TOML tomli_w writes for them); anything else is
/// refused with one line.
public struct ClusterConfig: Equatable, Sendable {
    public static let fileName = "config.toml"
    public static let keys: Set<String> = ["role", "token", "tls", "interfaces", "name"]

    public var role: String
    public var token: String
    public var tls: String?  // relative to the config directory, or absolute
    public var interfaces: [String] = ["auto"]
    public var name: String?

    /// The config directory: $FLASHMESH_CONFIG_DIR, else platformdirs' user config directory
    /// (~/Library/Application Support/flashmesh on Apple platforms, $XDG_CONFIG_HOME or ~/.config elsewhere).
    public static func directory(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let override = environment["FLASHMESH_CONFIG_DIR"], !override.isEmpty { return (override as NSString).expandingTildeInPath }
        let home = environment["HOME"] ?? NSHomeDirectory()
        #if canImport(Darwin)
        return "\(home)/Library/Application Support/flashmesh"
        #else
        let base = environment["XDG_CONFIG_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? "\(home)/.config"
        return "\(base)/flashmesh"
        #endif
    }

    /// The config file of `directory`, or nil when there is none.
    public static func load(directory: String) throws(UserError) -> ClusterConfig? {
        let path = "\(directory)/\(fileName)"
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try parse([UInt8](data), source: path)
    }

    /// Reads the TOML of a config file (`source` names it in messages).
    public static func parse(_ bytes: [UInt8], source: String) throws(UserError) -> ClusterConfig {
        var values: [String: TOMLValue]
        do {
            values = try TOMLValue.table(String(decoding: bytes, as: UTF8.self))
        } catch {
            throw UserError("\(source) cannot be read (\(error.reason)); fix it, or remove it and run `flashmesh cluster init`")
        }
        if let unknown = values.keys.sorted().first(where: { !keys.contains($0) }) {
            throw UserError("\(source): unexpected key '\(unknown)'; the keys are role, token, tls, interfaces, name")
        }
        func string(_ key: String) throws(UserError) -> String? {
            switch values.removeValue(forKey: key) {
            case nil: return nil
            case let .string(s)?: return s
            case .array?: throw UserError("\(source): \(key) is a string")
            }
        }
        guard let role = try string("role"), let token = try string("token") else {
            throw UserError("\(source): role and token are required; the keys are role, token, tls, interfaces, name")
        }
        var config = ClusterConfig(role: role, token: token, tls: try string("tls"), name: try string("name"))
        switch values["interfaces"] {
        case nil: break
        case .string("auto")?: config.interfaces = ["auto"]
        case let .array(items)?: config.interfaces = items
        case let .string(other)?:
            throw UserError("\(source): interfaces is \"auto\" or a list of IPv4 addresses, not '\(other)'")
        }
        return config
    }
}

/// A TOML value of the kinds a flashmesh config holds: a basic string or an array of them.
enum TOMLValue: Equatable {
    case string(String)
    case array([String])

    struct Invalid: Error {
        let reason: String
    }

    /// `key = value` lines (comments and blank lines allowed; arrays may span lines).
    static func table(_ text: String) throws(Invalid) -> [String: TOMLValue] {
        var scanner = Scanner(Array(text.unicodeScalars))
        var table: [String: TOMLValue] = [:]
        while true {
            scanner.skipBlank(newlines: true)
            guard let c = scanner.peek else { return table }
            guard c.properties.isAlphabetic || ("0"..."9").contains(c) || c == "_" || c == "-" else {
                throw Invalid(reason: "line \(scanner.line): expected a key")
            }
            let key = scanner.bareKey()
            scanner.skipBlank(newlines: false)
            guard scanner.take("=") else { throw Invalid(reason: "line \(scanner.line): expected '=' after \(key)") }
            scanner.skipBlank(newlines: false)
            let value: TOMLValue
            if scanner.take("[") {
                var items: [String] = []
                while true {
                    scanner.skipBlank(newlines: true)
                    if scanner.take("]") { break }
                    items.append(try scanner.basicString())
                    scanner.skipBlank(newlines: true)
                    if scanner.take("]") { break }
                    guard scanner.take(",") else { throw Invalid(reason: "line \(scanner.line): expected ',' or ']'") }
                }
                value = .array(items)
            } else {
                value = .string(try scanner.basicString())
            }
            guard table[key] == nil else { throw Invalid(reason: "line \(scanner.line): \(key) given twice") }
            table[key] = value
            scanner.skipBlank(newlines: false)
            guard scanner.peek == nil || scanner.take("\n") else {
                throw Invalid(reason: "line \(scanner.line): one key = value per line")
            }
        }
    }

    private struct Scanner {
        let text: [Unicode.Scalar]
        var i = 0
        var line = 1

        init(_ text: [Unicode.Scalar]) { self.text = text }

        var peek: Unicode.Scalar? { i < text.count ? text[i] : nil }

        mutating func take(_ c: Unicode.Scalar) -> Bool {
            guard peek == c else { return false }
            if c == "\n" { line += 1 }
            i += 1
            return true
        }

        mutating func skipBlank(newlines: Bool) {
            while let c = peek {
                if c == " " || c == "\t" || c == "\r" {
                    i += 1
                } else if c == "#" {
                    while let d = peek, d != "\n" { i += 1 }
                } else if newlines, c == "\n" {
                    _ = take("\n")
                } else {
                    return
                }
            }
        }

        mutating func bareKey() -> String {
            var key = ""
            while let c = peek, c.properties.isAlphabetic || ("0"..."9").contains(c) || c == "_" || c == "-" {
                key.unicodeScalars.append(c)
                i += 1
            }
            return key
        }

        mutating func basicString() throws(Invalid) -> String {
            guard take("\"") else { throw Invalid(reason: "line \(line): expected a \"string\"") }
            var out = ""
            while let c = peek {
                i += 1
                switch c {
                case "\"": return out
                case "\n": throw Invalid(reason: "line \(line): unterminated string")
                case "\\":
                    guard let e = peek else { break }
                    i += 1
                    let simple: [Unicode.Scalar: Unicode.Scalar] = ["\"": "\"", "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "b": "\u{8}", "f": "\u{C}"]
                    if let s = simple[e] {
                        out.unicodeScalars.append(s)
                    } else if e == "u" || e == "U" {
                        let n = e == "u" ? 4 : 8
                        guard i + n <= text.count, let code = UInt32(String(String.UnicodeScalarView(text[i..<i + n])), radix: 16),
                            let scalar = Unicode.Scalar(code)
                        else { throw Invalid(reason: "line \(line): bad \\\(e) escape") }
                        out.unicodeScalars.append(scalar)
                        i += n
                    } else {
                        throw Invalid(reason: "line \(line): unknown escape \\\(e)")
                    }
                default: out.unicodeScalars.append(c)
                }
            }
            throw Invalid(reason: "line \(line): unterminated string")
        }
    }
}
