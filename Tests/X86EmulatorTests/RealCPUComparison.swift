import KVMEngine
import VirtCore
@testable import X86Emulator

/// What a generated instruction sequence left behind on one engine.
protocol GeneratedOutcome: Equatable, CustomStringConvertible {
    /// The sequence ran to its final `ud2` (no exception on the way).
    var completed: Bool { get }
}

/// A generated instruction sequence that runs on any engine.
protocol GeneratedCase {
    associatedtype Outcome: GeneratedOutcome
    var code: [GeneratedInstruction] { get set }
    func run(on engine: any Engine) throws -> Outcome
}

/// Runs generated sequences on the real CPU (KVM: CPL3 code runs natively) and on the
/// software engine, interpreted and translated; each disagreement is reported with the
/// sequence shrunk to the instructions that still disagree.
struct RealCPUComparison {
    /// Sequences that ran to their end on the real CPU.
    private(set) var completed = 0
    private(set) var mismatches: [String] = []

    init<Case: GeneratedCase>(seeds: ClosedRange<UInt64>, _ sequence: (UInt64) -> Case) throws {
        let kvm = try KVMEngine()
        for seed in seeds {
            let c = sequence(seed)
            let expected = try c.run(on: kvm)
            if expected.completed { completed += 1 }
            for translation in [false, true] {
                let got = try c.run(on: SoftwareEngine(translation: translation))
                if got != expected {
                    let shrunk = try Self.shrink(c, kvm, translation: translation)
                    let code = shrunk.code.map { $0.bytes.map { String($0, radix: 16) }.joined(separator: " ") }.joined(separator: " | ")
                    let cpu = try shrunk.run(on: kvm), software = try shrunk.run(on: SoftwareEngine(translation: translation))
                    mismatches.append("seed \(seed) translation \(translation): \(code)\n  cpu: \(cpu)\n  sw:  \(software)")
                }
            }
        }
    }

    /// Drops instructions while the disagreement persists.
    private static func shrink<Case: GeneratedCase>(_ c: Case, _ kvm: KVMEngine, translation: Bool) throws -> Case {
        var current = c
        var i = 0
        while i < current.code.count {
            var candidate = current
            candidate.code.remove(at: i)
            if try candidate.run(on: kvm) != candidate.run(on: SoftwareEngine(translation: translation)) { current = candidate } else { i += 1 }
        }
        return current
    }
}
