import Devices
import VirtCore

/// What a malicious host tries against a confidential VM (S11). Each targets the victim
/// guest's data pages (Guests/confidential) after it wrote them, while its vCPU is out of
/// `run()` at an exit.
public enum ConfidentialAttack: String, Sendable, Codable, CaseIterable, CustomStringConvertible {
    /// Point a data page at another host frame (second-level remap).
    case remap
    /// Put a page's old ciphertext back (recorded earlier from host memory).
    case replay
    /// Map two guest data pages onto one host frame.
    case alias
    /// A device writes into a private page (DMA).
    case dma

    public var description: String { rawValue }
}

/// What became of one attack.
public struct ConfidentialAttackOutcome: Sendable, Codable, Equatable {
    public var attack: ConfidentialAttack
    /// The host's own write was refused (the reverse map guards the frame): its message.
    public var hostWriteRefused: String?
    /// What the host did in the end.
    public var action: String
}

/// Port 0x82 of the victim guest: its first write is the address of its data, then phase
/// numbers; at phase 1 the host records a page's ciphertext, at phase 2 it attacks.
// SAFETY: written on the vCPU thread at exits; `outcome` is read after the machine stopped.
public final class ConfidentialAttackPort: PortIODevice, @unchecked Sendable {
    public static let port: UInt16 = 0x82
    public var name: String { "confidential-attack" }
    let attack: ConfidentialAttack?
    let machine: Machine
    private var dataAddress: UInt64?
    private var recordedCiphertext: [UInt8] = []
    public private(set) var outcome: ConfidentialAttackOutcome?
    /// Host-memory copies taken at phase 2 before any attack (the host's view, for tests).
    public private(set) var hostViewAtAttack: [UInt8] = []

    /// The data pages the attacks use (within the victim's 16).
    static let victimPage = 3, otherPage = 5

    public init(machine: Machine, attack: ConfidentialAttack?) throws {
        self.machine = machine
        self.attack = attack
        try machine.attach(self, firstPort: Self.port, count: 1)
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        guard let data = dataAddress else { dataAddress = UInt64(value); return }
        let page = Int(data >> 12) + Self.victimPage
        switch value {
        case 1:
            recordedCiphertext = (try? machine.memory.read(at: UInt64(frame(of: page)) << 12, count: 4096)) ?? []
        case 2:
            hostViewAtAttack = (try? machine.memory.read(at: data, count: 16 * 4096)) ?? []
            if let attack { outcome = perform(attack, page: page, other: Int(data >> 12) + Self.otherPage) }
        default:
            break
        }
    }

    private func frame(of page: Int) -> Int { (machine.vm as? any FrameRemapping)?.frame(of: page) ?? page }

    private func perform(_ attack: ConfidentialAttack, page: Int, other: Int) -> ConfidentialAttackOutcome {
        let vm = machine.vm
        let encrypted = vm as? any EncryptedMemory
        var outcome = ConfidentialAttackOutcome(attack: attack, hostWriteRefused: nil, action: "")
        /// A host write to `frame`; with a reverse map it is refused, and the host then
        /// does what SNP leaves it: reclaim the frame, write, and give it back.
        func hostWrite(_ bytes: [UInt8], frame: Int, guestPage: Int) {
            let gpa = UInt64(frame) << 12
            do {
                try machine.memory.write(bytes, at: gpa)
                outcome.action += "host wrote frame \(frame)"
            } catch {
                outcome.hostWriteRefused = "\(error)"
                outcome.action += "write refused; "
                guard let encrypted, (try? encrypted.rmpUpdate(frame: frame, guestPage: nil)) != nil,
                      (try? machine.memory.write(bytes, at: gpa)) != nil,
                      (try? encrypted.rmpUpdate(frame: frame, guestPage: guestPage)) != nil else {
                    outcome.action += "RMPUPDATE refused"
                    return
                }
                outcome.action += "reclaimed frame \(frame) (RMPUPDATE), wrote it, assigned it back"
            }
            vm.noteHostWrite(gpa: gpa, length: UInt64(bytes.count))
        }
        switch attack {
        case .remap:
            // A frame of free RAM far from the data: another page's ciphertext.
            let target = min(page + 2048, Int(machine.memory.size >> 12) - 1024)
            if let remap = vm as? any FrameRemapping {
                remap.map(page: page, toFrame: frame(of: target), permissions: .all)
                outcome.action = "guest page \(page) now maps host frame \(frame(of: target))"
            } else {
                outcome.action = "the engine cannot remap frames"
            }
        case .replay:
            hostWrite(recordedCiphertext, frame: frame(of: page), guestPage: page)
        case .alias:
            if let remap = vm as? any FrameRemapping {
                remap.map(page: page, toFrame: frame(of: other), permissions: .all)
                outcome.action = "guest pages \(page) and \(other) now share host frame \(frame(of: other))"
            } else {
                outcome.action = "the engine cannot remap frames"
            }
        case .dma:
            hostWrite([UInt8](repeating: 0xD3, count: 512), frame: frame(of: page), guestPage: page)
        }
        return outcome
    }
}
