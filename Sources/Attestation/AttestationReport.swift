import Crypto
import FoundationEssentials
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

// Attestation of confidential VMs (docs/confidential-vm.md): P-384 signatures by swift-crypto,
// apart from the VMM so that `swiftvisor` does not link swift-crypto and the Foundation it
// imports (README, *Start-up and footprint*); swiftvisor-api carries out what needs it.

/// An attestation report in SEV-SNP's shape: the launch measurement, signed with this
/// host's P-384 key (`HostAttestationKey`).
public struct AttestationReport: Sendable, Codable, Equatable {
    public var version = 1
    public var guest: String
    public var measurement: LaunchMeasurement
    /// The signer's public key, X9.63 uncompressed point, hex.
    public var hostPublicKey: String
    /// ECDSA P-384 / SHA-384 over `signedBytes`, DER, hex.
    public var signature: String

    var signedBytes: [UInt8] {
        Array("swiftvisor-attestation-v\(version)\n\(guest)\n\(measurement.mode.rawValue)\n\(measurement.digest)\n\(measurement.measuredPages)\n\(hostPublicKey)".utf8)
    }

    public static func sign(_ measurement: LaunchMeasurement, guest: String, key: P384.Signing.PrivateKey) throws -> AttestationReport {
        var r = AttestationReport(guest: guest, measurement: measurement, hostPublicKey: Hex.encode(key.publicKey.x963Representation), signature: "")
        r.signature = Hex.encode(try key.signature(for: r.signedBytes).derRepresentation)
        return r
    }

    public static func publicKey(hex: String) -> P384.Signing.PublicKey? {
        Hex.decode(hex).flatMap { try? P384.Signing.PublicKey(x963Representation: $0) }
    }

    /// Checks the signature, and that the signer is `trustedKey` when given.
    public func verify(trustedKey: P384.Signing.PublicKey? = nil) throws {
        guard let keyBytes = Hex.decode(hostPublicKey), let key = try? P384.Signing.PublicKey(x963Representation: keyBytes) else {
            throw ConfidentialError("the report's host key is not a P-384 public key")
        }
        if let trustedKey, trustedKey.x963Representation != key.x963Representation {
            throw ConfidentialError("the report was signed by another host's key")
        }
        guard let sigBytes = Hex.decode(signature), let sig = try? P384.Signing.ECDSASignature(derRepresentation: sigBytes) else {
            throw ConfidentialError("the report's signature is malformed")
        }
        guard key.isValidSignature(sig, for: signedBytes) else { throw ConfidentialError("the report's signature does not verify") }
    }
}

/// This host's attestation key: P-384, created on first use at
/// `$SWIFTVISOR_HOME/attestation-p384.pem` (default `~/.swiftvisor`).
public enum HostAttestationKey {
    public static var path: String {
        if let home = getenv("SWIFTVISOR_HOME") { return String(cString: home) + "/attestation-p384.pem" }
        let home = getenv("HOME").map { String(cString: $0) } ?? HostPaths.temporaryDirectory
        return home + "/.swiftvisor/attestation-p384.pem"
    }

    /// A fresh key (what `load` creates on first use).
    public static func generate() -> P384.Signing.PrivateKey { P384.Signing.PrivateKey() }

    public static func load(createIfMissing: Bool = true) throws -> P384.Signing.PrivateKey {
        let url = URL(fileURLWithPath: path)
        if let data = try? Data(contentsOf: url), let pem = String(data: data, encoding: .utf8) {
            do { return try P384.Signing.PrivateKey(pemRepresentation: pem) } catch {
                throw ConfidentialError("\(path) is not a P-384 private key in PEM")
            }
        }
        guard createIfMissing else { throw ConfidentialError("no attestation key at \(path)") }
        let key = P384.Signing.PrivateKey()
        mkdir(url.deletingLastPathComponent().path, 0o700)
        try Data(key.pemRepresentation.utf8).write(to: url, options: .atomic)
        chmod(path, 0o600)
        return key
    }
}

enum Hex {
    static func encode<D: Sequence>(_ bytes: D) -> String where D.Element == UInt8 {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    static func decode(_ s: String) -> [UInt8]? {
        let chars = Array(s.utf8)
        guard chars.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(chars.count / 2)
        for i in stride(from: 0, to: chars.count, by: 2) {
            guard let b = UInt8(String(decoding: chars[i..<(i + 2)], as: UTF8.self), radix: 16) else { return nil }
            out.append(b)
        }
        return out
    }
}
