import Foundation

/// One DER element (tag, length, content), enough of ASN.1 to read the fields of an X.509 certificate
/// and a private key that the node checks before it serves (TLSIdentity). Nothing is verified here:
/// the signatures are gRPC's (the C core verifies every client certificate against the CA).
struct DER: Sendable {
    struct Malformed: Error {}

    static let sequence: UInt8 = 0x30, set: UInt8 = 0x31, oid: UInt8 = 0x06, octets: UInt8 = 0x04
    static let bits: UInt8 = 0x03, integer: UInt8 = 0x02, utcTime: UInt8 = 0x17, generalizedTime: UInt8 = 0x18

    let tag: UInt8
    let content: ArraySlice<UInt8>
    /// The whole element, header included (names are compared as these bytes).
    let encoded: ArraySlice<UInt8>

    /// The element at the start of `bytes` and what follows it.
    static func read(_ bytes: ArraySlice<UInt8>) throws(Malformed) -> (DER, rest: ArraySlice<UInt8>) {
        var i = bytes.startIndex
        guard bytes.count >= 2 else { throw Malformed() }
        let tag = bytes[i]
        guard tag & 0x1F != 0x1F else { throw Malformed() }  // multi-byte tags: not in certificates
        i += 1
        var length = Int(bytes[i])
        i += 1
        if length & 0x80 != 0 {
            let count = length & 0x7F
            guard (1...4).contains(count), bytes.endIndex - i >= count else { throw Malformed() }
            length = bytes[i..<i + count].reduce(0) { $0 << 8 | Int($1) }
            i += count
        }
        guard bytes.endIndex - i >= length else { throw Malformed() }
        let element = DER(tag: tag, content: bytes[i..<i + length], encoded: bytes[bytes.startIndex..<i + length])
        return (element, bytes[(i + length)...])
    }

    /// The single element that is all of `bytes`.
    static func parse(_ bytes: ArraySlice<UInt8>) throws(Malformed) -> DER {
        let (element, rest) = try read(bytes)
        guard rest.isEmpty else { throw Malformed() }
        return element
    }

    /// The elements inside a constructed one (a SEQUENCE, SET or explicit tag).
    func children() throws(Malformed) -> [DER] {
        guard tag & 0x20 != 0 else { throw Malformed() }
        var rest = content
        var found: [DER] = []
        while !rest.isEmpty {
            let (element, tail) = try DER.read(rest)
            found.append(element)
            rest = tail
        }
        return found
    }

    func expect(_ expected: UInt8) throws(Malformed) -> DER {
        guard tag == expected else { throw Malformed() }
        return self
    }

    /// A BIT STRING's bits (whole bytes: keys and signatures have no unused bits).
    func bitString() throws(Malformed) -> ArraySlice<UInt8> {
        guard tag == DER.bits, content.first == 0 else { throw Malformed() }
        return content.dropFirst()
    }

    /// A UTCTime or GeneralizedTime in UTC ("YYMMDDHHMMSSZ", "YYYYMMDDHHMMSSZ") as a Date.
    func time() throws(Malformed) -> Date {
        let text = Array(content)
        let yearDigits = tag == DER.utcTime ? 2 : 4
        guard tag == DER.utcTime || tag == DER.generalizedTime, text.count == yearDigits + 11, text.last == UInt8(ascii: "Z")
        else { throw Malformed() }
        func number(_ from: Int, _ count: Int) throws(Malformed) -> Int {
            var n = 0
            for c in text[from..<from + count] {
                guard (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) else { throw Malformed() }
                n = n * 10 + Int(c - UInt8(ascii: "0"))
            }
            return n
        }
        var year = try number(0, yearDigits)
        if yearDigits == 2 { year += year < 50 ? 2000 : 1900 }  // RFC 5280 4.1.2.5.1
        let fields = try (0..<5).map { (i: Int) throws(Malformed) -> Int in try number(yearDigits + 2 * i, 2) }
        let days = CivilDate.days(year: year, month: fields[0], day: fields[1])
        let seconds = ((days * 24 + fields[2]) * 60 + fields[3]) * 60 + fields[4]
        return Date(timeIntervalSince1970: TimeInterval(seconds))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date and back (H. Hinnant's civil algorithms), so that
/// certificate times need no Calendar, and are printed as Python prints them ("%Y-%m-%d %H:%M" UTC).
enum CivilDate {
    static func days(year: Int, month: Int, day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        return era * 146_097 + dayOfEra - 719_468
    }

    /// "2026-12-01 13:55" (UTC), or "2026-12-01" with `time` false.
    static func format(_ date: Date, time: Bool = true) -> String {
        let seconds = Int(date.timeIntervalSince1970.rounded(.down))
        let z = Int((Double(seconds) / 86_400).rounded(.down)) + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        let secondOfDay = seconds - (z - 719_468) * 86_400
        func two(_ n: Int) -> String { n < 10 ? "0\(n)" : "\(n)" }
        let dateText = "\(year)-\(two(month))-\(two(day))"
        return time ? "\(dateText) \(two(secondOfDay / 3600)):\(two(secondOfDay / 60 % 60))" : dateText
    }
}
