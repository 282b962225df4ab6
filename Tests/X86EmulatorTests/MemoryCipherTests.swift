import CHost
import Testing

/// The confidential VMs' memory cipher (CHost/xts.c): AES-128-XTS, IEEE 1619.
@Suite(.enabled(if: host_aes_available() != 0, "the host CPU lacks AES-NI"))
struct MemoryCipherTests {
    func hex(_ b: [UInt8]) -> String { b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }

    func encrypt(key: [UInt8], unit: UInt64, _ plain: [UInt8]) -> [UInt8] {
        var k = host_xts_key()
        host_xts_init(&k, key)
        var out = [UInt8](repeating: 0, count: plain.count)
        host_xts_encrypt(&k, unit, plain, &out, plain.count)
        return out
    }

    @Test func ieee1619Vectors() {
        // Vector 1: zero keys, zero tweak, 32 zero bytes.
        #expect(hex(encrypt(key: [UInt8](repeating: 0, count: 32), unit: 0, [UInt8](repeating: 0, count: 32)))
                == "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e")
        // Vector 2: keys 0x11…/0x22…, tweak 0x3333333333, 32 bytes of 0x44.
        #expect(hex(encrypt(key: [UInt8](repeating: 0x11, count: 16) + [UInt8](repeating: 0x22, count: 16), unit: 0x33_3333_3333,
                            [UInt8](repeating: 0x44, count: 32)))
                == "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")
    }

    @Test func aWholePageMatchesAnotherImplementationAndRoundTrips() {
        // Reference: pyca/cryptography's AES-XTS over the same 4 KiB (bytes i*7), tweak 0x1234.
        let key = [UInt8](repeating: 0x11, count: 16) + [UInt8](repeating: 0x22, count: 16)
        let plain = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let c = encrypt(key: key, unit: 0x1234, plain)
        #expect(hex(Array(c[0..<16])) == "68950ede3e61f6b4081e75bfcb1efcd6")
        #expect(hex(Array(c[4080..<4096])) == "75b804c814b89a5e910332a2ddad292d")
        var k = host_xts_key()
        host_xts_init(&k, key)
        var back = [UInt8](repeating: 0, count: 4096)
        host_xts_decrypt(&k, 0x1234, c, &back, 4096)
        #expect(back == plain)
        // Another frame (tweak), same plaintext: another ciphertext.
        #expect(encrypt(key: key, unit: 0x1235, plain) != c)
    }
}
