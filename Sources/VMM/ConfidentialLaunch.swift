import VirtCore

/// Launching a confidential VM (scenario S11; docs/confidential-vm.md): the VMM prepares
/// the initial image in plaintext as for any VM, marks it confidential, then — as SEV's
/// LAUNCH_UPDATE_DATA — hashes each measured page and has the engine encrypt it in place;
/// the digest also covers the boot vCPU's entry state. `measure(image:…)` recomputes the
/// same digest offline from the ELF file.
public enum ConfidentialLaunch {
    /// Boot-info fields (docs/guest-abi.md): flags at +36, the shared region at +432/+440.
    static let flagsOffset: UInt64 = 36
    static let sharedGPAOffset: UInt64 = 432
    static let sharedSizeOffset: UInt64 = 440
    static let flagConfidential: UInt32 = 1, flagSNP: UInt32 = 2
    /// The shared (plaintext) region for virtio bounce buffers: the top 2 MiB of RAM.
    public static let sharedSize: UInt64 = 2 << 20

    public static func sharedRegion(ramSize: UInt64) -> Range<UInt64> { (ramSize - sharedSize)..<ramSize }

    /// Marks the prepared image confidential: the boot info's flags and shared region, and
    /// the C-bit on every 2 MiB mapping of private RAM (the page tables are measured, so the
    /// guest can trust which pages are private).
    static func markConfidential(memory: GuestMemory, mode: ConfidentialMode) throws {
        let b = BootLayout.bootInfoAddress
        try memory.store(flagConfidential | (mode == .snp ? flagSNP : 0), at: b + flagsOffset)
        let shared = sharedRegion(ramSize: memory.size)
        try memory.store(shared.lowerBound, at: b + sharedGPAOffset)
        try memory.store(UInt64(shared.count), at: b + sharedSizeOffset)
        let firstPD = BootLayout.pml4Address + 0x2000
        for page in stride(from: UInt64(0), to: shared.lowerBound, by: 2 << 20) {
            let slot = firstPD + (page >> 30) * 0x1000 + ((page >> 21) & 0x1FF) * 8
            let entry: UInt64 = try memory.load(at: slot)
            try memory.store(entry | ConfidentialLayout.cBit, at: slot)
        }
    }

    /// The pages measured at launch: the VMM's area below 1 MiB and the image's segments.
    static func measuredPages(image: ELFImage, ramSize: UInt64) -> [Range<Int>] {
        var ranges = [0..<Int(BootLayout.imageBase >> 12)]
        for s in image.segments.sorted(by: { $0.physicalAddress < $1.physicalAddress }) {
            let first = Int(s.physicalAddress >> 12), end = Int(min((s.physicalAddress + s.memorySize + 0xFFF) >> 12, ramSize >> 12))
            guard first < end else { continue }
            if let last = ranges.last, first <= last.upperBound {
                ranges[ranges.count - 1] = last.lowerBound..<max(last.upperBound, end)
            } else {
                ranges.append(first..<end)
            }
        }
        return ranges
    }

    /// Hashes `pages` (address, then contents) and the entry state; `encrypt` runs on each
    /// range right after it is hashed.
    static func digest(memory: GuestMemory, pages: [Range<Int>], entry: VCPUState, mode: ConfidentialMode,
                       encrypt: (Range<Int>) throws -> Void) throws -> String {
        var hash = SHA256Hash()
        hash.update(data: Array("swiftvisor-launch-v1 \(mode.rawValue)".utf8))
        for range in pages {
            for page in range {
                var address = UInt64(page << 12).littleEndian
                withUnsafeBytes(of: &address) { hash.update(bufferPointer: $0) }
                try memory.withBytes(at: UInt64(page << 12), count: GuestMemory.pageSize) { hash.update(bufferPointer: $0) }
            }
            try encrypt(range)
        }
        var state: [UInt64] = [entry.rip, entry.rsp, entry.rdi, entry.rsi, entry.rflags, entry.cr0, entry.cr3, entry.cr4, entry.efer,
                               entry.gdt.base, UInt64(entry.gdt.limit), UInt64(entry.cs.selector)]
        for i in state.indices { state[i] = state[i].littleEndian }
        state.withUnsafeBytes { hash.update(bufferPointer: $0) }
        return hash.finalize().map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    /// Launches `vm` from the plaintext image in `memory`: marks it confidential, measures
    /// and encrypts. Before any vCPU runs.
    static func launch(vm: any EncryptedMemory, memory: GuestMemory, image: ELFImage, entry: VCPUState,
                       mode: ConfidentialMode) throws -> LaunchMeasurement {
        try markConfidential(memory: memory, mode: mode)
        let pages = measuredPages(image: image, ramSize: memory.size)
        let digest = try digest(memory: memory, pages: pages, entry: entry, mode: mode) { try vm.launchUpdate(pages: $0) }
        let shared = sharedRegion(ramSize: memory.size)
        try vm.finishLaunch(shared: Int(shared.lowerBound >> 12)..<Int(shared.upperBound >> 12))
        return LaunchMeasurement(mode: mode, digest: digest, measuredPages: pages.reduce(0) { $0 + $1.count })
    }

    /// The launch digest of `image` booted with `memorySize` and `commandLine` and no
    /// devices, computed without running it (`swiftvisor measure`).
    public static func measure(image: ELFImage, memorySize: UInt64, commandLine: String, mode: ConfidentialMode,
                               hypercall: HypercallMechanism = .vmcall) throws -> LaunchMeasurement {
        let memory = try GuestMemory(size: memorySize, name: "swiftvisor-measure")
        try BootLayout.prepare(memory: memory, vcpuCount: 1, commandLine: commandLine, hypercall: hypercall)
        try image.load(into: memory)
        try markConfidential(memory: memory, mode: mode)
        let pages = measuredPages(image: image, ramSize: memory.size)
        let entry = BootLayout.initialState(vcpu: 0, entry: image.entry)
        let digest = try digest(memory: memory, pages: pages, entry: entry, mode: mode) { _ in }
        return LaunchMeasurement(mode: mode, digest: digest, measuredPages: pages.reduce(0) { $0 + $1.count })
    }
}

/// What a confidential VM was launched with.
public struct LaunchMeasurement: Sendable, Codable, Equatable {
    public var mode: ConfidentialMode
    /// SHA-256 of the measured pages and the boot vCPU's entry state, hex.
    public var digest: String
    public var measuredPages: Int
}
