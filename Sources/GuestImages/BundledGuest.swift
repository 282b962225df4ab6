import FoundationEssentials

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
        guard let data = Data(base64Encoded: base64) else {
            preconditionFailure("bundled guest \(name) has a corrupt embedded image")
        }
        return [UInt8](data)
    }
}

public enum BundledGuests {
    /// Every bundled guest, sorted by name.
    public static var all: [BundledGuest] { generatedGuests.sorted { $0.name < $1.name } }

    public static func named(_ name: String) -> BundledGuest? {
        generatedGuests.first { $0.name == name }
    }
}
