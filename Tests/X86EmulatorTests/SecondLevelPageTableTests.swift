import Testing
import VirtCore
@testable import X86Emulator

/// The EPT model: dirty flags for dirty logging, write protection for copy-on-write.
@Suite struct SecondLevelPageTableTests {
    /// `mov [rbx], rax; hlt` — run twice over the same page.
    static let storeAndHalt: [UInt8] = [0x48, 0x89, 0x03, 0xF4]

    func machine(_ code: [UInt8], rbx: UInt64) throws -> (SoftwareVirtualMachine, any VCPU, GuestMemory) {
        let memory = try GuestMemory(size: 8 << 20)
        try GuestABI.prepare(memory)
        try memory.write(code, at: Snippet.codeAddress)
        let vm = try SoftwareEngine().makeVM(memory: memory, config: VMConfig(vcpuCount: 1)) as! SoftwareVirtualMachine
        let vcpu = try vm.makeVCPU(id: 0)
        var s = GuestABI.entryState(rip: Snippet.codeAddress)
        s.rbx = rbx
        s.rax = 0x1122_3344
        try vcpu.setState(s)
        return (vm, vcpu, memory)
    }

    @Test func writesSetDirtyFlagsAgainAfterEachCollection() throws {
        let (vm, vcpu, _) = try machine(Self.storeAndHalt, rbx: 0x40_0000)
        try vm.setDirtyLogging(true)
        #expect(try vcpu.run() == .halt)
        let first = try vm.fetchDirtyLog()
        #expect(first[0x400])
        #expect(!first[0x401])
        #expect(try vm.fetchDirtyLog().isEmpty)  // fetching cleared it
        // Same translation, still cached in the TLB: the store must be seen again.
        var s = try vcpu.getState()
        s.rip = Snippet.codeAddress
        try vcpu.setState(s)
        #expect(try vcpu.run() == .halt)
        #expect(try vm.fetchDirtyLog()[0x400])
    }

    @Test func writeToAProtectedPageExitsBeforeWriting() throws {
        let (vm, vcpu, memory) = try machine(Self.storeAndHalt, rbx: 0x40_0010)
        vm.secondLevel.setPermissions([.read, .execute], pages: 0x400..<0x401)
        #expect(try vcpu.run() == .memoryFault(gpa: 0x40_0010, access: .write))
        #expect(try memory.load(UInt64.self, at: 0x40_0010) == 0)
        #expect(try vcpu.getState().rip == Snippet.codeAddress)  // restarts the store
        vm.secondLevel.setPermissions(.all, pages: 0x400..<0x401)
        #expect(try vcpu.run() == .halt)
        #expect(try memory.load(UInt64.self, at: 0x40_0010) == 0x1122_3344)
    }

    @Test func aCachedWritableTranslationIsDroppedByProtection() throws {
        // First store caches a writable translation; protecting the page (INVEPT) must
        // make the second store exit.
        let code: [UInt8] = [0x48, 0x89, 0x03, 0xF4, 0x48, 0x89, 0x43, 0x08, 0xF4]  // mov [rbx],rax; hlt; mov [rbx+8],rax; hlt
        let (vm, vcpu, _) = try machine(code, rbx: 0x40_0000)
        #expect(try vcpu.run() == .halt)
        vm.secondLevel.setPermissions(.read, pages: 0x400..<0x401)
        #expect(try vcpu.run() == .memoryFault(gpa: 0x40_0008, access: .write))
    }

    @Test func executeFromANonExecutablePageExits() throws {
        let (vm, vcpu, _) = try machine(Self.storeAndHalt, rbx: 0x40_0000)
        vm.secondLevel.setPermissions([.read, .write], pages: 0x100..<0x101)
        #expect(try vcpu.run() == .memoryFault(gpa: Snippet.codeAddress, access: .execute))
    }

    @Test func interruptDeliveryOntoAProtectedStackIsRetried() throws {
        // hlt with IF set; the interrupt's frame goes to the stack page, write-protected.
        let (vm, vcpu, memory) = try machine([0xFB, 0xF4, 0xF4], rbx: 0) // sti; hlt; hlt
        try installHaltingIDTAt(memory)
        var s = try vcpu.getState()
        s.idt = DescriptorTableRegister(base: 0x5000, limit: 48 * 16 - 1)
        s.rsp = 0x70_0000
        try vcpu.setState(s)
        #expect(try vcpu.run() == .halt)
        vm.secondLevel.setPermissions([.read, .execute], pages: 0x6FF..<0x700)
        vcpu.injectInterrupt(vector: 0x21)
        #expect(try vcpu.run() == .memoryFault(gpa: 0x6F_FFD8, access: .write))
        vm.secondLevel.setPermissions(.all, pages: 0x6FF..<0x700)
        #expect(try vcpu.run() == .halt)  // delivered: the handler at 0x6000 halts
        #expect(try vcpu.getState().rip == 0x6001)
        #expect(try memory.load(UInt64.self, at: 0x6F_FFD8) == Snippet.codeAddress + 2)  // return RIP in the frame
    }

    func installHaltingIDTAt(_ memory: GuestMemory) throws {
        try memory.store(UInt8(0xF4), at: 0x6000)
        for v in UInt64(0)..<48 {
            try memory.store(UInt64(0x6000 | (0x08 << 16) | (0x8E00 << 32)), at: 0x5000 + v * 16)
            try memory.store(UInt64(0), at: 0x5000 + v * 16 + 8)
        }
    }
}
