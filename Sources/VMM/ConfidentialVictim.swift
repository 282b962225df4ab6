import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// One run of the victim guest (Guests/confidential) with the host's attack port attached,
/// and what the host can tell from memory it reads: the set-up the S11 lab and its tests share.
package struct ConfidentialVictimRun {
    package var machine: Machine
    package var port: ConfidentialAttackPort
    package var result: RunResult
    package var output: String

    /// The pattern the victim writes into its 16 private data pages at run time (its image
    /// holds it scrambled, so finding it means reading the guest's data).
    package static let pattern = Array("CONFIDENTIAL".utf8)

    /// Builds the victim (software engine, 64 MiB) in `mode` with `attack` armed, lets
    /// `prepare` change the machine before it starts, and runs it to its end.
    package static func run(_ mode: ConfidentialMode?, attack: ConfidentialAttack? = nil, timeoutSeconds: Double = 120,
                            prepare: (Machine) throws -> Void = { _ in }) throws -> ConfidentialVictimRun {
        let output = Mutex<[UInt8]>([])
        var config = MachineConfiguration(memorySize: 64 << 20, timeoutSeconds: timeoutSeconds, guestName: "confidential")
        config.confidential = mode
        let machine = try Machine(image: try GuestProgram.load("confidential"), configuration: config,
                                  engine: try EngineSelection.make(.software), serialOutput: { b in output.withLock { $0.append(b) } })
        let port = try ConfidentialAttackPort(machine: machine, attack: attack)
        try prepare(machine)
        let result = try machine.run()
        return ConfidentialVictimRun(machine: machine, port: port, result: result,
                                     output: String(decoding: output.withLock { $0 }, as: UTF8.self))
    }

    /// Whether `bytes` hold the victim's pattern.
    package static func containsPattern(_ bytes: [UInt8]) -> Bool {
        let needle = pattern
        guard bytes.count >= needle.count else { return false }
        for start in 0...(bytes.count - needle.count) where bytes[start] == needle[0] {
            if bytes[start..<(start + needle.count)].elementsEqual(needle) { return true }
        }
        return false
    }

    /// Shannon entropy in bits per byte (ciphertext is near 8, the victim's data far below).
    package static func entropy(_ bytes: [UInt8]) -> Double {
        guard !bytes.isEmpty else { return 0 }
        var counts = [Int](repeating: 0, count: 256)
        for b in bytes { counts[Int(b)] += 1 }
        return counts.reduce(0.0) { e, c in
            guard c > 0 else { return e }
            let p = Double(c) / Double(bytes.count)
            return e - p * log2(p)
        }
    }
}
