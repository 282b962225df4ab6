/// Parses and prints sizes like `64M`, `1G`, `512K`, `2097152`.
public enum MemorySize {
    /// Accepts a number with an optional unit K, M or G (powers of 1024), optionally
    /// followed by `B` or `iB`: `64M`, `64MiB`, `1g`, `2097152`.
    public static func parse(_ text: String) -> UInt64? {
        var t = Substring(text.uppercased())
        if t.hasSuffix("IB") { t = t.dropLast(2) } else if t.hasSuffix("B") { t = t.dropLast() }
        var shift: UInt64 = 0
        switch t.last {
        case "K": shift = 10
        case "M": shift = 20
        case "G": shift = 30
        default: break
        }
        if shift != 0 { t = t.dropLast() }
        guard !t.isEmpty, t.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(t) else { return nil }
        let (v, overflow) = n.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : v
    }

    public static func format(_ bytes: UInt64) -> String {
        for (unit, shift) in [("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes)"
    }
}
