import Attestation
import FoundationEssentials
import SwiftvisorCLI
import VMM
import VirtCore

/// `verify` and `run --attestation-report`, with this host's P-384 key (AttestationCommands.swift).
struct AttestationReports: AttestationImplementation {
    func verify(reportPath: String, expectedDigest: String?, hostKeyHex: String?) throws -> String {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let r = try decoder.decode(AttestationReport.self, from: try Data(contentsOf: URL(fileURLWithPath: reportPath)))
        let trusted = try hostKeyHex.map { hex in
            guard let key = AttestationReport.publicKey(hex: hex) else { throw ConfidentialError("--host-key is not a P-384 public key") }
            return key
        } ?? HostAttestationKey.load(createIfMissing: false).publicKey
        try r.verify(trustedKey: trusted)
        if let m = expectedDigest, m.lowercased() != r.measurement.digest {
            throw ConfidentialError("the launch digest \(r.measurement.digest) is not the expected \(m.lowercased())")
        }
        return "verified: \(r.guest) launched \(r.measurement.mode) with measurement \(r.measurement.digest)"
    }

    func reportWriter(path: String, guest: String) throws -> @Sendable (LaunchMeasurement) throws -> Void {
        _ = try HostAttestationKey.load()
        return { measurement in
            try writeJSON(path, try AttestationReport.sign(measurement, guest: guest, key: try HostAttestationKey.load()))
        }
    }
}
