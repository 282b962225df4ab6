import Testing
import VirtCore
@testable import X86Emulator

/// The software engine's half of shadow paging, with hand-built shadow tables: it walks
/// only those, and exits for misses, write traps, CR3 loads and INVLPG.
@Suite struct ShadowModeEngineTests {
    typealias P = ShadowPageTablePool
    static let readData: [UInt8] = [0x48, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00]   // mov rax, [0x200000]
    static let writeData: [UInt8] = [0x48, 0x89, 0x1C, 0x25, 0x00, 0x00, 0x20, 0x00]  // mov [0x200000], rbx

    /// Shadow tables mapping the code page (1 MiB) to itself and linear 0x200000 to `dataLeaf`.
    static func shadowed(_ code: [UInt8], dataLeaf: UInt64?) throws -> (Snippet, SoftwareVirtualCPU, P) {
        let s = try Snippet(code, engine: SoftwareEngine(translation: false)) { $0.rbx = 0x5555 }
        try s.memory.store(UInt64(0x1111), at: 0x20_0000)
        try s.memory.store(UInt64(0x2222), at: 0x30_0000)
        let pool = P(pageCount: 8)
        let table = P.present | P.writable | P.user
        pool.setEntry(page: 1, index: 0, 2 << 12 | table)
        pool.setEntry(page: 2, index: 0, 3 << 12 | table)
        pool.setEntry(page: 3, index: 0, 4 << 12 | table)
        pool.setEntry(page: 3, index: 1, 5 << 12 | table)
        pool.setEntry(page: 4, index: 256, 0x10_0000 | table)
        if let leaf = dataLeaf { pool.setEntry(page: 5, index: 0, leaf) }
        let vcpu = try #require(s.vcpu as? SoftwareVirtualCPU)
        vcpu.enableShadowPaging(pool)
        vcpu.shadowRoot = 1
        return (s, vcpu, pool)
    }

    @Test func translatesOnlyThroughTheShadowTables() throws {
        // The guest's tables map 0x200000 to itself; the shadow maps it to 0x300000.
        let (s, _, _) = try Self.shadowed(Self.readData + [0xF4], dataLeaf: 0x30_0000 | P.present)
        #expect(try s.run() == .halt)
        #expect(try s.state.rax == 0x2222)
    }

    @Test func aMissExitsWithoutTouchingCR2ThenResumes() throws {
        let (s, _, pool) = try Self.shadowed(Self.readData + [0xF4], dataLeaf: nil)
        #expect(try s.run() == .shadowPaging(.pageFault(linear: 0x20_0000, errorCode: 0)))
        #expect(try s.state.cr2 == 0)
        #expect(try s.state.rip == Snippet.codeAddress)  // fault-like: the load is retried
        pool.setEntry(page: 5, index: 0, 0x20_0000 | P.present)
        #expect(try s.run() == .halt)
        #expect(try s.state.rax == 0x1111)
    }

    @Test func aTrappedWriteExitsIsEmulatedOnceAndNeverCached() throws {
        let leaf = 0x20_0000 | P.present | P.writable | P.writeTrap
        let (s, vcpu, _) = try Self.shadowed(Self.writeData + Self.writeData + [0xF4], dataLeaf: leaf)
        #expect(try s.run() == .shadowPaging(.pageFault(linear: 0x20_0000, errorCode: 3)))
        vcpu.emulateTrappedWrite(frame: 0x20_0000)
        #expect(try s.memory.load(UInt64.self, at: 0x20_0000) == 0x5555)
        #expect(try s.state.rip == Snippet.codeAddress + 8)
        // The second write traps again: the emulated one left no writable TLB entry.
        #expect(try s.run() == .shadowPaging(.pageFault(linear: 0x20_0000, errorCode: 3)))
    }

    @Test func cr3LoadsAndInvlpgExitAfterTheInstruction() throws {
        // mov rax, cr3; mov cr3, rax; invlpg [0x200000]; hlt
        let code: [UInt8] = [0x0F, 0x20, 0xD8, 0x0F, 0x22, 0xD8, 0x0F, 0x01, 0x3C, 0x25, 0x00, 0x00, 0x20, 0x00, 0xF4]
        let (s, vcpu, _) = try Self.shadowed(code, dataLeaf: 0x20_0000 | P.present)
        let cr3 = try s.state.cr3
        #expect(try s.run() == .shadowPaging(.contextSwitch(cr3: cr3)))
        #expect(vcpu.shadowRoot == 0)  // the VMM picks the root for the new CR3
        #expect(try s.run() == .shadowPaging(.pageFault(linear: Snippet.codeAddress + 6, errorCode: 0x10)))
        vcpu.shadowRoot = 1
        #expect(try s.run() == .shadowPaging(.invalidatePage(linear: 0x20_0000)))
        #expect(try s.run() == .halt)
    }

    /// With MBEC, a fetch through a supervisor mapping needs the second level's `.execute`
    /// and one through a user mapping `.userExecute`; the violation's qualification says which.
    @Test(arguments: [false, true])
    func modeBasedExecuteControl(_ mbec: Bool) throws {
        let s = try Snippet([0xF4], engine: SoftwareEngine(translation: false))  // the boot map's pages are user pages
        let vm = try #require(s.vcpu as? SoftwareVirtualCPU).vm
        vm.modeBasedExecute = mbec
        vm.setPermissions([.read, .write, .execute], pages: 0x100..<0x101)
        let exit = try s.run()
        if mbec {
            #expect(exit == .memoryFault(gpa: Snippet.codeAddress, access: .execute))
            let q = try #require((s.vcpu as? any SecondLevelViolationReporting)?.lastSecondLevelViolation)
            #expect(q.userAddress && q.modeBasedExecute && q.linear == Snippet.codeAddress)
            #expect(q.allowed == [.read, .write, .execute])
        } else {
            #expect(exit == .halt)
        }
    }
}
