import Attestation
import Foundation
import GuestImages
import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import VMM

/// S11: confidential VMs on the software engine (docs/confidential-vm.md).
@Suite struct ConfidentialVMTests {
    /// The victim guest with the host's attack port, run to its end (the lab runs the same).
    func victim(_ mode: ConfidentialMode?, attack: ConfidentialAttack? = nil) throws -> ConfidentialVictimRun {
        try ConfidentialVictimRun.run(mode, attack: attack)
    }

    @Test(arguments: [ConfidentialMode.sev, .snp])
    func computePrintsWhatItPrintsUnencrypted(mode: ConfidentialMode) throws {
        let plain = try runGuest("compute", engine: .software, memory: 64 << 20)
        let secret = try runGuest("compute", engine: .software, memory: 64 << 20, confidential: mode)
        #expect(secret.result.stopReason == .exitPort(status: 0))
        #expect(secret.output == plain.output)
        let encrypted = try #require(secret.machine.vm as? any EncryptedMemory)
        #expect(encrypted.confidentialCounters.decryptions > 0)
        #expect(secret.machine.launchMeasurement?.mode == mode)
    }

    @Test func aSmallWorkingSetEvictsAndStillComputesTheSame() throws {
        let plain = try runGuest("compute", engine: .software, memory: 64 << 20)
        let secret = try runGuest("compute", engine: .software, memory: 64 << 20, confidential: .snp, workingSetPages: 32)
        #expect(secret.output == plain.output)
        let counters = try #require(secret.machine.vm as? any EncryptedMemory).confidentialCounters
        #expect(counters.evictions > 1000)
        #expect(counters.encryptions > 1000)
    }

    @Test(arguments: [ConfidentialMode.sev, .snp])
    func theHostSeesOnlyCiphertext(mode: ConfidentialMode) throws {
        // Control: an ordinary VM's host memory shows the pattern.
        let plain = try victim(nil)
        #expect(plain.output.contains("data intact"))
        #expect(ConfidentialVictimRun.containsPattern(plain.port.hostViewAtAttack))
        #expect(ConfidentialVictimRun.entropy(plain.port.hostViewAtAttack) < 4)

        let secret = try victim(mode)
        #expect(secret.result.stopReason == .exitPort(status: 0))
        #expect(secret.output.contains("confidential: \(mode == .snp ? "SEV-SNP" : "SEV")"))
        #expect(secret.output.contains("data intact"))
        #expect(!ConfidentialVictimRun.containsPattern(secret.port.hostViewAtAttack))
        #expect(ConfidentialVictimRun.entropy(secret.port.hostViewAtAttack) > 7.9)
        let ram = try secret.machine.memory.read(at: 0, count: Int(secret.machine.memory.size))
        let shared = ConfidentialLaunch.sharedRegion(ramSize: secret.machine.memory.size)
        #expect(!ConfidentialVictimRun.containsPattern(Array(ram[0..<Int(shared.lowerBound)])))
        // The copy the guest put in the shared bounce region (for a device) is plaintext.
        #expect(ConfidentialVictimRun.containsPattern(Array(ram[Int(shared.lowerBound)..<Int(shared.upperBound)])))
    }

    @Test func snapshotsAndMigrationAreRefusedWithTheReason() throws {
        let m = try bundledMachine("hello", engine: .software, confidential: .snp, capture: SerialCapture())
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("cvm-\(getpid()).snap").path
        #expect {
            try m.snapshot(to: path)
        } throws: { error in
            "\(error)".contains("confidential VM cannot be snapshotted or migrated")
        }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test(.requiresKVM("the KVM engine's refusal is the point"))
    func theKVMEngineRefusesWithOneLine() throws {
        #expect {
            try bundledMachine("hello", engine: .kvm, confidential: .snp, capture: SerialCapture())
        } throws: { error in
            "\(error)" == "the kvm engine cannot encrypt guest memory (confidential VMs; the host CPU has no SEV), which a confidential VM needs"
        }
    }

    @Test(arguments: [PagePermissions.read.union(.execute), []])
    func secondLevelPermissionsAreStillEnforced(allowed: PagePermissions) throws {
        let capture = SerialCapture()
        let m = try bundledMachine("confidential", engine: .software, memory: 64 << 20, confidential: .snp, capture: capture)
        let port = try ConfidentialAttackPort(machine: m, attack: nil)
        let sl = try m.vm.require(SecondLevelTranslation.self, .secondLevelTranslation)
        // Write-protected: the image's writable segments (the guest's data among them);
        // unmapped: every segment, its code too.
        let image = try #require(m.image)
        var pages: [Range<Int>] = []
        for s in image.segments where s.flags & 2 != 0 || allowed.isEmpty {
            pages.append(Int(s.physicalAddress >> 12)..<Int((s.physicalAddress + s.memorySize + 0xFFF) >> 12))
        }
        for r in pages { sl.setPermissions(allowed, pages: r) }
        let faults = Mutex<[(UInt64, MemoryAccessKind)]>([])
        m.memoryFaultHandler.set { gpa, access in
            faults.withLock { $0.append((gpa, access)) }
            // The VMM sees the fault (address and access), never the contents: they are ciphertext.
            sl.setPermissions(.all, pages: Int(gpa >> 12)..<Int(gpa >> 12) + 1)
            return true
        }
        let result = try m.run()
        #expect(result.stopReason == .exitPort(status: 0))
        #expect(capture.text.contains("data intact"))
        let seen = faults.withLock { $0 }
        #expect(!seen.isEmpty)
        #expect(seen.allSatisfy { f in pages.contains { $0.contains(Int(f.0 >> 12)) } })
        if allowed.isEmpty {
            #expect(seen.contains { $0.1 == MemoryAccessKind.execute })
        } else {
            #expect(seen.allSatisfy { $0.1 == MemoryAccessKind.write })
        }
        #expect(!ConfidentialVictimRun.containsPattern(port.hostViewAtAttack))
    }

    @Test(arguments: ConfidentialAttack.allCases)
    func withoutTheReverseMapTheGuestComputesOnAlteredData(attack: ConfidentialAttack) throws {
        let r = try victim(.sev, attack: attack)
        #expect(r.result.stopReason == .exitPort(status: 3), "\(r.output)")
        #expect(r.output.contains("DATA CHANGED"))
        #expect(!r.output.contains("#VC"))
        #expect(r.port.outcome?.hostWriteRefused == nil)
    }

    @Test(arguments: ConfidentialAttack.allCases)
    func withTheReverseMapEveryAttackIsDetected(attack: ConfidentialAttack) throws {
        let r = try victim(.snp, attack: attack)
        let outcome = try #require(r.port.outcome)
        // The guest's runtime reports #VC (vector 29) and exits with 0x80 + 29.
        #expect(r.result.stopReason == .exitPort(status: 0x80 + 29), "\(r.output)")
        #expect(r.output.contains("#VC: reverse-map violation"))
        #expect(!r.output.contains("DATA CHANGED"))
        if attack == .replay || attack == .dma {
            // And the host's direct write was refused first.
            #expect(outcome.hostWriteRefused?.contains("belongs to a confidential VM") == true)
        }
        let vm = try #require(r.machine.vm as? any EncryptedMemory)
        #expect(vm.confidentialCounters.rmpViolations >= 1)
    }

    @Test func theGuestValidatesItsPrivatePagesAndTheSharedRegionStaysTheHosts() throws {
        let r = try victim(.snp)
        let vm = try #require(r.machine.vm as? any EncryptedMemory)
        let frames = Int(r.machine.memory.size >> 12)
        let shared = ConfidentialLaunch.sharedRegion(ramSize: r.machine.memory.size)
        for f in [0, 0x100, 0x2000, Int(shared.lowerBound >> 12) - 1] {
            let e = try #require(vm.rmpEntry(frame: f))
            #expect(e.assigned && e.validated && e.guestPage == f && !e.immutable, "frame \(f)")
        }
        #expect(vm.rmpEntry(frame: frames - 1)?.assigned == false)
        #expect(vm.confidentialCounters.pagesValidated > 0)
        #expect(throws: GuestMemoryError.guestOwned(gpa: 0x2000 << 12)) { try r.machine.memory.store(UInt8(1), at: 0x2000 << 12) }
        try r.machine.memory.store(UInt8(1), at: shared.lowerBound)  // shared: the host's
    }

    @Test func theLaunchMeasurementIsReproducibleOfflineAndTheReportVerifies() throws {
        let r = try victim(.snp)
        let launched = try #require(r.machine.launchMeasurement)
        let image = try #require(r.machine.image)
        let offline = try ConfidentialLaunch.measure(image: image, memorySize: 64 << 20, commandLine: "", mode: .snp)
        #expect(offline == launched)
        #expect(try ConfidentialLaunch.measure(image: image, memorySize: 64 << 20, commandLine: "x=1", mode: .snp).digest != launched.digest)
        #expect(try ConfidentialLaunch.measure(image: image, memorySize: 64 << 20, commandLine: "", mode: .sev).digest != launched.digest)

        let key = HostAttestationKey.generate()
        let report = try AttestationReport.sign(launched, guest: "confidential", key: key)
        try report.verify(trustedKey: key.publicKey)
        var forged = report
        forged.measurement.digest = String(repeating: "0", count: 64)
        #expect(throws: ConfidentialError.self) { try forged.verify(trustedKey: key.publicKey) }
        #expect(throws: ConfidentialError.self) { try report.verify(trustedKey: HostAttestationKey.generate().publicKey) }
    }

    @Test func deduplicationMergesNoPrivatePages() throws {
        let a = try victim(.snp), b = try victim(.snp)
        let dedup = try PageDeduplicator(machines: [a.machine, b.machine])
        let shared = ConfidentialLaunch.sharedRegion(ramSize: a.machine.memory.size)
        #expect(dedup.findDuplicates(in: 0..<Int(shared.lowerBound >> 12)).isEmpty)
    }
}

/// The bundled virtio guests as confidential VMs: queues and buffers go through the shared
/// bounce region (Guests/runtime/virtio.c), the devices never touch private memory.
@Suite struct ConfidentialVirtioTests {
    @Test(arguments: [ConfidentialMode.sev, .snp], [true, false])
    func diskGuestReadsAndWritesItsImage(mode: ConfidentialMode, interrupts: Bool) throws {
        let disk = try TemporaryDisk(sectors: 64, sector0: "boot sector of a test image")
        let capture = SerialCapture()
        let m = try bundledMachine("disk", engine: .software, commandLine: "irq=\(interrupts ? 1 : 0)", confidential: mode, capture: capture)
        let transport = try m.addVirtioBlock(path: disk.path)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.contains("disk: sector 0: boot sector of a test image"))
        #expect(capture.text.contains("disk: reading past the end is refused, as it should be (status 1)"))
        let expected = Array("written by the disk guest through virtio-blk\n".utf8)
        #expect(try Array(disk.sector(1).prefix(expected.count)) == expected)
        #expect(!transport.needsReset)
    }

    @Test(arguments: [ConfidentialMode.sev, .snp])
    func twoConfidentialVMsExchangeFramesOverASwitch(mode: ConfidentialMode) throws {
        let lan = "cvm-lan-\(mode)-\(UInt32.random(in: 0...UInt32.max))"
        let pingOut = SerialCapture(), pongOut = SerialCapture()
        let ping = try bundledMachine("net-ping", engine: .software, commandLine: "count=5 irq=1", confidential: mode, capture: pingOut)
        let pong = try bundledMachine("net-ping", engine: .software, commandLine: "pong=1 count=5 irq=1", confidential: mode, capture: pongOut)
        try pong.addVirtioNet(backend: NetworkAttachment.networkSwitch(lan).makeBackend())
        try ping.addVirtioNet(backend: NetworkAttachment.networkSwitch(lan).makeBackend())
        let pongThread = HostThread(name: "pong") { _ = try? pong.run() }
        try #require(waitUntil { pongOut.text.contains("net: pong") }, "pong VM never became ready: \(pongOut.text)")
        let r = try ping.run()
        pongThread.join()
        #expect(r.stopReason == .exitPort(status: 0), "\(pingOut.text)")
        #expect(pingOut.text.hasSuffix("net: echoed 5 of 5 frames\n"))
        #expect(pongOut.text.hasSuffix("net: answered 5 of 5 frames\n"))
    }
}
