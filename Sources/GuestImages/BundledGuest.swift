
/// A guest program shipped inside the `swiftvisor` binary: a static ELF64 built from
/// `Guests/` by the GuestBuildPlugin at build time.
public struct BundledGuest: Sendable {
    /// Short name used on the command line (`swiftvisor run <name>`).
    public let name: String
    /// One line saying what the guest does.
    public let summary: String
    /// Whether the guest exists to exercise a failure path in tests (not shown by default).
    public let isTestGuest: Bool
    private let base64: String

    init(name: String, summary: String, isTestGuest: Bool, base64: String) {
        self.name = name
        self.summary = summary
        self.isTestGuest = isTestGuest
        self.base64 = base64
    }

    /// The ELF image bytes.
    public var elf: [UInt8] {
        // The generator only emits valid base64; a failure here means a broken build.
        guard let bytes = Self.decodeBase64(base64) else {
            preconditionFailure("bundled guest \(name) has a corrupt embedded image")
        }
        return bytes
    }

    /// Standard base64 with padding (a small decoder: `run` keeps Foundation out of the process).
    static func decodeBase64(_ text: String) -> [UInt8]? {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8.enumerated() { table[Int(c)] = UInt8(i) }
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count / 4 * 3)
        var accumulator: UInt32 = 0, bits = 0, padding = 0
        for c in text.utf8 {
            if c == UInt8(ascii: "=") { padding += 1; continue }
            guard padding == 0 else { return nil }  // data after padding
            let v = table[Int(c)]
            guard v != 0xFF else { return nil }
            accumulator = accumulator << 6 | UInt32(v)
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: accumulator >> UInt32(bits)))
            }
        }
        guard (text.utf8.count % 4) == 0, padding <= 2 else { return nil }
        return out
    }
}

public enum BundledGuests {
    /// Every bundled guest, sorted by name.
    public static var all: [BundledGuest] { generatedGuests.sorted { $0.name < $1.name } }

    public static func named(_ name: String) -> BundledGuest? {
        generatedGuests.first { $0.name == name }
    }
}
