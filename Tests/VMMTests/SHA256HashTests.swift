import Crypto
import Testing
import TestSupport
@testable import VMM

/// The launch measurement's own SHA-256 (VMM/SHA256Hash.swift) against FIPS 180-4's examples
/// and swift-crypto's, on lengths around every block and padding boundary, fed in pieces.
@Suite struct SHA256HashTests {
    func hex(_ bytes: some Sequence<UInt8>) -> String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }

    func ours(_ message: [UInt8], pieces: [Int] = []) -> [UInt8] {
        var hash = SHA256Hash()
        var rest = message[...]
        for n in pieces where n <= rest.count {
            hash.update(data: Array(rest.prefix(n)))
            rest = rest.dropFirst(n)
        }
        hash.update(data: Array(rest))
        return hash.finalize()
    }

    @Test func fipsExamples() {
        #expect(hex(ours(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hex(ours([])) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(hex(ours(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
    }

    @Test func matchesSwiftCryptoInAnyPieces() {
        var rng = SplitMix64(seed: 0x5A256)
        for length in Array(0...200) + [1000, 4096, 4097, 65_537] {
            let message = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let pieces = (0..<4).map { _ in Int.random(in: 0...130, using: &rng) }
            let expected = hex(SHA256.hash(data: message))
            #expect(hex(ours(message)) == expected, "length \(length)")
            #expect(hex(ours(message, pieces: pieces)) == expected, "length \(length) in pieces \(pieces)")
        }
    }
}
