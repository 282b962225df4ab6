import CHost
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The memory path of a confidential VM on the software engine (the model of SEV's memory
/// controller and SNP's reverse map).
///
/// Host memory — the memfd every VMM service sees — holds private frames only as AES-XTS
/// ciphertext under a key generated here at launch, with the host frame number as tweak
/// (the physical address a memory controller encrypts by). The vCPU reads and writes
/// through `view`, a mapping of its own: shared frames are the memfd itself (plaintext, for
/// devices), private frames are anonymous pages that hold plaintext only while the frame
/// is in the decrypted working set — `capacity` lines, like a CPU cache. A line is filled
/// when a TLB entry for a private page is made (so the per-access paths are unchanged), is
/// written back encrypted when evicted and at every exit to the VMM, and is zeroed when it
/// leaves the set. Page-table pages and instruction fetches are always private, as on SEV.
///
/// Single vCPU (the working set is the vCPU's). Host-side calls (launch, flush, reverse-map
/// updates) are made while the vCPU is out of `run()`.
// SAFETY: the buffers are allocated once and freed in deinit; the vCPU thread uses them
// inside run(), the VMM only while the vCPU is out of run() (the contract above).
final class ConfidentialMemory: @unchecked Sendable {
    let mode: ConfidentialMode
    let memory: GuestMemory
    let frameCount: Int
    /// The vCPU's view of RAM (see above); what `CPU.ram` points at.
    let view: UnsafeMutableRawPointer
    private let key: UnsafeMutablePointer<host_xts_key>
    let capacity: Int

    /// Per frame: working-set line + 1 (0: not resident), and its state bits.
    private let lineOfFrame: UnsafeMutablePointer<Int32>
    private let frameState: UnsafeMutablePointer<UInt8>
    private enum State {
        /// The view maps the memfd page (shared, plaintext).
        static let shared: UInt8 = 1
        /// The memfd holds the frame's ciphertext (from launch on, for every private frame).
        static let encrypted: UInt8 = 2
    }
    /// Per line: the frame it holds (-1: free), written since its last write-back, referenced (CLOCK).
    private let frameOfLine: UnsafeMutablePointer<Int32>
    private let lineDirty: UnsafeMutablePointer<UInt8>
    private let lineReferenced: UnsafeMutablePointer<UInt8>
    private var clockHand = 0
    private var dirtyLines = 0

    /// SNP's reverse map, per host frame (nil in SEV mode). `rmpOwned` doubles as the
    /// `GuestMemory` write guard.
    let rmp: ReverseMap?
    var counters = ConfidentialCounters()

    init(memory: GuestMemory, mode: ConfidentialMode, capacity: Int) throws {
        guard host_aes_available() != 0 else { throw ConfidentialError("this host CPU lacks AES-NI, which the memory cipher uses") }
        self.mode = mode
        self.memory = memory
        frameCount = Int(memory.size >> 12)
        self.capacity = max(16, min(capacity, frameCount))
        guard let v = mmap(nil, Int(memory.size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
              v != MAP_FAILED else { throw ConfidentialError("cannot map the confidential VM's view of RAM (errno \(errno))") }
        view = v
        var bytes = [UInt8](repeating: 0, count: 32)
        let rc = host_random_bytes(&bytes, 32)
        guard rc == 0 else {
            munmap(v, Int(memory.size))
            throw ConfidentialError("cannot generate the memory key (errno \(-rc))")
        }
        key = .allocate(capacity: 1)
        host_xts_init(key, bytes)
        for i in bytes.indices { bytes[i] = 0 }
        lineOfFrame = .allocate(capacity: frameCount)
        lineOfFrame.initialize(repeating: 0, count: frameCount)
        frameState = .allocate(capacity: frameCount)
        frameState.initialize(repeating: 0, count: frameCount)
        frameOfLine = .allocate(capacity: self.capacity)
        frameOfLine.initialize(repeating: -1, count: self.capacity)
        lineDirty = .allocate(capacity: self.capacity)
        lineDirty.initialize(repeating: 0, count: self.capacity)
        lineReferenced = .allocate(capacity: self.capacity)
        lineReferenced.initialize(repeating: 0, count: self.capacity)
        rmp = mode == .snp ? ReverseMap(frameCount: frameCount) : nil
    }

    deinit {
        munmap(view, Int(memory.size))
        key.update(repeating: host_xts_key(), count: 1)
        key.deallocate()
        lineOfFrame.deallocate()
        frameState.deallocate()
        frameOfLine.deallocate()
        lineDirty.deallocate()
        lineReferenced.deallocate()
    }

    // MARK: Cipher

    @inline(__always)
    private func encrypt(frame: Int, from source: UnsafeRawPointer) {
        host_xts_encrypt(key, UInt64(frame), source, memory.base + frame << 12, 4096)
        counters.encryptions &+= 1
    }

    @inline(__always)
    private func decrypt(frame: Int, into destination: UnsafeMutableRawPointer) {
        host_xts_decrypt(key, UInt64(frame), memory.base + frame << 12, destination, 4096)
        counters.decryptions &+= 1
    }

    // MARK: Launch (vCPUs not yet running)

    /// Encrypts frames in place: their plaintext, written by the VMM, becomes ciphertext.
    func encryptInPlace(frames: Range<Int>) {
        for f in frames.clamped(to: 0..<frameCount) where frameState[f] & (State.shared | State.encrypted) == 0 {
            let page = memory.base + f << 12
            host_xts_encrypt(key, UInt64(f), page, page, 4096)
            frameState[f] |= State.encrypted
            counters.encryptions &+= 1
        }
    }

    func isEncrypted(frame: Int) -> Bool { frameState[frame] & State.encrypted != 0 }

    /// Makes the view of `frames` the memfd itself (shared, plaintext).
    func share(frames: Range<Int>) throws {
        guard !frames.isEmpty else { return }
        for f in frames { if lineOfFrame[f] != 0 { evict(line: Int(lineOfFrame[f]) - 1) } }
        try mapShared(frames)
        for f in frames { frameState[f] |= State.shared }
    }

    private func mapShared(_ frames: Range<Int>) throws {
        let offset = frames.lowerBound << 12, length = frames.count << 12
        let p = mmap(view + offset, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memory.fileDescriptor, off_t(offset))
        guard p != MAP_FAILED else { throw ConfidentialError("cannot map shared guest pages (errno \(errno))") }
    }

    private func mapPrivate(_ frame: Int) -> Bool {
        let p = mmap(view + frame << 12, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        return p != MAP_FAILED
    }

    // MARK: Working set (vCPU thread)

    func isShared(frame: Int) -> Bool { frameState[frame] & State.shared != 0 }

    /// Makes `frame` accessible as private plaintext. Returns false when that took
    /// another frame out of the set (cached translations must then be dropped).
    @inline(__always)
    func makeResident(frame: Int, write: Bool) -> (dirty: Bool, evicted: Bool) {
        var line = Int(lineOfFrame[frame]) - 1
        var evicted = false
        if line < 0 {
            (line, evicted) = fill(frame: frame)
        }
        lineReferenced[line] = 1
        if write && lineDirty[line] == 0 {
            lineDirty[line] = 1
            dirtyLines += 1
        }
        return (lineDirty[line] != 0, evicted)
    }

    /// Marks the resident frame `frame` written (the page walker's accessed/dirty updates).
    @inline(__always)
    func noteWrite(frame: Int) {
        let line = Int(lineOfFrame[frame]) - 1
        if line >= 0 && lineDirty[line] == 0 {
            lineDirty[line] = 1
            dirtyLines += 1
        }
    }

    private func fill(frame: Int) -> (line: Int, evicted: Bool) {
        var evicted = false
        if frameState[frame] & State.shared != 0 {
            // A private access to a shared frame (the guest set the C-bit on it): the
            // memory controller decrypts whatever the memfd holds.
            _ = mapPrivate(frame)
            frameState[frame] &= ~State.shared
            counters.conversions &+= 1
            evicted = true
        }
        // CLOCK: the first line not referenced since the hand last passed.
        var line = clockHand
        while frameOfLine[line] >= 0 && lineReferenced[line] != 0 {
            lineReferenced[line] = 0
            line = line + 1 == capacity ? 0 : line + 1
        }
        clockHand = line + 1 == capacity ? 0 : line + 1
        if frameOfLine[line] >= 0 {
            evict(line: line)
            counters.evictions &+= 1
            evicted = true
        }
        decrypt(frame: frame, into: view + frame << 12)
        frameOfLine[line] = Int32(frame)
        lineOfFrame[frame] = Int32(line + 1)
        return (line, evicted)
    }

    /// Writes `line` back if dirty and zeroes its plaintext.
    private func evict(line: Int) {
        let frame = Int(frameOfLine[line])
        guard frame >= 0 else { return }
        let plain = view + frame << 12
        if lineDirty[line] != 0 {
            encrypt(frame: frame, from: plain)
            lineDirty[line] = 0
            dirtyLines -= 1
        }
        memset(plain, 0, 4096)
        frameOfLine[line] = -1
        lineOfFrame[frame] = 0
        lineReferenced[line] = 0
    }

    /// A shared access to `frame`: the view must show the memfd (ciphertext, if the frame
    /// was private). Returns true when the frame's view changed.
    func makeShared(frame: Int) -> Bool {
        guard frameState[frame] & State.shared == 0 else { return false }
        if lineOfFrame[frame] != 0 { evict(line: Int(lineOfFrame[frame]) - 1) }
        guard (try? mapShared(frame..<(frame + 1))) != nil else { return false }
        frameState[frame] |= State.shared
        counters.conversions &+= 1
        return true
    }

    /// At every exit to the VMM: dirty lines are encrypted into host memory (they stay
    /// resident, clean). Returns whether any was dirty (write permissions cached for them
    /// must go, so the next write marks the line again).
    func writeBack() -> Bool {
        guard dirtyLines > 0 else { return false }
        for line in 0..<capacity where lineDirty[line] != 0 {
            let frame = Int(frameOfLine[line])
            encrypt(frame: frame, from: view + frame << 12)
            lineDirty[line] = 0
        }
        dirtyLines = 0
        return true
    }

    /// Writes back and drops every line (pause, snapshot, host writes to RAM).
    func dropAll() {
        for line in 0..<capacity where frameOfLine[line] >= 0 { evict(line: line) }
    }

    /// Drops the lines of frames the host rewrote (their plaintext is stale). Called with
    /// the vCPU out of run(), after `writeBack`, so no line is dirty.
    func dropFrames(_ frames: Range<Int>) {
        for f in frames.clamped(to: 0..<frameCount) where lineOfFrame[f] != 0 { evict(line: Int(lineOfFrame[f]) - 1) }
    }

    var residentLines: Int { (0..<capacity).reduce(0) { $0 + (frameOfLine[$1] >= 0 ? 1 : 0) } }
}

/// SEV-SNP's reverse map: one entry per host frame. `owned` (one byte per frame, non-zero
/// while assigned to the guest) is also the write guard `GuestMemory` checks.
// SAFETY: as ConfidentialMemory: the vCPU thread inside run(), the VMM only outside it.
final class ReverseMap: @unchecked Sendable {
    static let asid: UInt16 = 1
    let owned: UnsafeMutablePointer<UInt8>
    let guestPage: UnsafeMutablePointer<UInt32>
    let flags: UnsafeMutablePointer<UInt8>
    enum Flag {
        static let validated: UInt8 = 1, immutable: UInt8 = 2, large: UInt8 = 4
    }
    let count: Int

    init(frameCount: Int) {
        count = frameCount
        owned = .allocate(capacity: frameCount)
        owned.initialize(repeating: 0, count: frameCount)
        guestPage = .allocate(capacity: frameCount)
        guestPage.initialize(repeating: 0, count: frameCount)
        flags = .allocate(capacity: frameCount)
        flags.initialize(repeating: 0, count: frameCount)
    }

    deinit {
        owned.deallocate()
        guestPage.deallocate()
        flags.deallocate()
    }

    func entry(_ f: Int) -> RMPEntry {
        RMPEntry(assigned: owned[f] != 0, asid: owned[f] != 0 ? Self.asid : 0, guestPage: Int(guestPage[f]),
                 largePage: flags[f] & Flag.large != 0, validated: flags[f] & Flag.validated != 0,
                 immutable: flags[f] & Flag.immutable != 0)
    }

    func assign(frame f: Int, guestPage g: Int, validated: Bool, immutable: Bool) {
        owned[f] = 1
        guestPage[f] = UInt32(g)
        flags[f] = (validated ? Flag.validated : 0) | (immutable ? Flag.immutable : 0)
    }

    func reclaim(frame f: Int) {
        owned[f] = 0
        guestPage[f] = 0
        flags[f] = 0
    }

    /// The check after the nested walk: nil when the access may proceed, else the #VC error.
    @inline(__always)
    func check(frame f: Int, guestPage g: Int, private isPrivate: Bool) -> ConfidentialLayout.VCError? {
        if !isPrivate { return owned[f] != 0 ? .sharedAccessToPrivate : nil }
        if owned[f] == 0 { return .notAssigned }
        if Int(guestPage[f]) != g { return .wrongGuestPage }
        if flags[f] & Flag.validated == 0 { return .notValidated }
        return nil
    }
}
