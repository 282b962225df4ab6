import VMM

/// What needs the attestation key (P-384, swift-crypto — and the full Foundation swift-crypto
/// imports on Linux): `verify` and `run --attestation-report`. Like the operator commands it is
/// carried out by `swiftvisor-api`; `swiftvisor` validates the arguments, then hands the process
/// over (OperatorCommands.swift), so that it links neither library.
package protocol AttestationImplementation: Sendable {
    /// Checks the report at `reportPath` (signature, signer, and the digest when given); the
    /// line to print when it verifies, else throws why not.
    func verify(reportPath: String, expectedDigest: String?, hostKeyHex: String?) throws -> String
    /// Loads (creates on first use) this host's key now; what then signs a launch
    /// measurement into a report at `path`.
    func reportWriter(path: String, guest: String) throws -> @Sendable (LaunchMeasurement) throws -> Void
}

package enum AttestationCommands {
    /// Set by swiftvisor-api's entry point before parsing; nil in `swiftvisor`.
    // SAFETY: written once at process start, before any command runs or thread starts.
    nonisolated(unsafe) package static var implementation: (any AttestationImplementation)?

    /// The implementation here, or else the process becomes swiftvisor-api (before any VM exists).
    static func resolved() throws -> any AttestationImplementation {
        guard let implementation else { try OperatorCommands.handOver() }
        return implementation
    }
}
