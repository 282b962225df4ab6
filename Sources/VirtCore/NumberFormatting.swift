#if canImport(Glibc)
import Glibc
#endif

// printf-style number formatting without Foundation: `swiftvisor run` keeps Foundation
// (and its start-up cost) out of the process.
extension BinaryFloatingPoint {
    /// `digits` decimals, as `%.<digits>f`; `sign: true` as `%+.<digits>f`.
    public func fixed(_ digits: Int, sign: Bool = false) -> String {
        formatC((sign ? "%+." : "%.") + "\(max(0, min(digits, 30)))f")
    }

    /// `digits` significant digits, as `%.<digits>g`.
    public func significant(_ digits: Int) -> String {
        formatC("%.\(max(1, min(digits, 30)))g")
    }

    private func formatC(_ format: String) -> String {
        let value = Double(self)
        // 400 bytes hold any double at up to 30 decimals (1.8e308 has 309 integer digits).
        return withUnsafeTemporaryAllocation(of: CChar.self, capacity: 400) { buffer in
            _ = withVaList([value]) { vsnprintf(buffer.baseAddress!, buffer.count, format, $0) }
            return String(cString: buffer.baseAddress!)
        }
    }
}

extension Duration {
    /// The duration in seconds, as a Double (for reports).
    package var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
