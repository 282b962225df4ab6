import CHost

/// A LOCK-prefixed instruction (or XCHG with memory) in progress on a VM with several
/// vCPUs. The instruction's read of RAM is recorded; its write then lands with a host
/// compare-exchange against the value read, so a plain store another vCPU made in between
/// (a spinlock's release, from translated code that takes no lock) is never overwritten:
/// the instruction runs again on the new value, as the locked read-modify-write of
/// SDM Vol. 3A §9.1.2 would have seen it.
struct LockedAccess {
    var active = false
    /// The RAM location read (guest-physical), its size and the value seen; `reads` > 1
    /// (a page-crossing or 16-byte operand): the write is stored plainly, serialised only
    /// with other locked instructions.
    var gpa: UInt64 = 0
    var size = 0
    var seen: UInt64 = 0
    var reads = 0
    /// The compare-exchange found another value: the instruction must run again.
    var conflict = false

    init(active: Bool = false) { self.active = active }

    @inline(__always)
    mutating func noteRead(_ gpa: UInt64, _ size: Int, _ value: UInt64) {
        reads &+= 1
        self.gpa = gpa
        self.size = size
        seen = value
    }

    /// Whether a write of `size` bytes at `gpa` is the read location's (then it goes
    /// through `store`).
    @inline(__always)
    func covers(_ gpa: UInt64, _ size: Int) -> Bool { reads == 1 && gpa == self.gpa && size == self.size }

    mutating func store(_ host: UnsafeMutableRawPointer, _ value: UInt64) {
        if host_compare_exchange(host, seen, value, Int32(size)) == 0 { conflict = true }
    }
}

extension CPU {
    /// Runs a locked instruction: serialised with the VM's other locked instructions by
    /// `lock`, and atomic against plain stores through `LockedAccess` (registers, flags and
    /// RIP are put back before a retry).
    func executeLocked(_ i: Instr, _ lock: AtomicInstructionLock) throws(Fault) {
        var saved = InlineArray<16, UInt64>(repeating: 0)
        for k in 0..<16 { saved[k] = gpr[k] }
        let savedFlags = rflags, savedRIP = rip, savedInstructions = instructions
        try lock.mutex.withLock { _ throws(Fault) in
            while true {
                lockedAccess = LockedAccess(active: true)
                defer { lockedAccess.active = false }
                try execute(i)
                if !lockedAccess.conflict { return }
                for k in 0..<16 { gpr[k] = saved[k] }
                rflags = savedFlags
                rip = savedRIP
                instructions = savedInstructions
            }
        }
    }
}
