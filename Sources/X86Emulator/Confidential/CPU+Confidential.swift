import VirtCore

/// The confidential memory path's hooks in the page walker: they run when a translation
/// is made (a TLB fill), never per access.
extension CPU {
    /// A page-table page the walker reads: always private (as on SEV), so it is checked
    /// against the reverse map and decrypted into the working set.
    @inline(never)
    func confidentialTableAccess(_ c: ConfidentialMemory, host: UInt64, gpa: UInt64) throws(Fault) {
        try reverseMapCheck(c, host: host, gpa: gpa, isPrivate: true)
        if c.makeResident(frame: Int(host >> 12), write: false).evicted { dropCachedTranslations() }
    }

    /// The page a translation being cached leads to, after the second-level check:
    /// private pages are checked against the reverse map and made resident; shared ones
    /// must show host memory. Returns whether the cached translation may allow writes
    /// (for a private page: its line is already marked written).
    @inline(never)
    func confidentialDataAccess(_ c: ConfidentialMemory, host: UInt64, gpa: UInt64, isPrivate: Bool, write: Bool) throws(Fault) -> Bool {
        if pvalidateWalk { pvalidateGuestPage = gpa >> 12 }
        try reverseMapCheck(c, host: host, gpa: gpa, isPrivate: isPrivate)
        let frame = Int(host >> 12)
        guard isPrivate else {
            if c.makeShared(frame: frame) { dropCachedTranslations() }
            return true
        }
        let r = c.makeResident(frame: frame, write: write)
        if r.evicted { dropCachedTranslations() }
        return r.dirty
    }

    @inline(__always)
    private func reverseMapCheck(_ c: ConfidentialMemory, host: UInt64, gpa: UInt64, isPrivate: Bool) throws(Fault) {
        guard let rmp = c.rmp, !pvalidateWalk else { return }
        if let error = rmp.check(frame: Int(host >> 12), guestPage: Int(gpa >> 12), private: isPrivate) {
            c.counters.rmpViolations &+= 1
            throw Fault.exception(vector: ConfidentialLayout.vcVector, errorCode: error.rawValue)
        }
    }

    /// A line left the working set or a frame changed views: every cached translation
    /// (interpreter TLB, fetch tag, translator TLB and jump cache) may point at it.
    func dropCachedTranslations() {
        flushTLB()
        flushTranslatorCaches()
    }

    /// PVALIDATE (F2 0F 01 FF): validates (EDX=1) or rescinds (EDX=0) the guest page at
    /// linear address RAX, 4 KiB (ECX=0) or 2 MiB (ECX=1), in the reverse map. RAX: 0 on
    /// success, 1 (FAIL_INPUT) when the page is not assigned to this guest at that
    /// address, 6 (FAIL_SIZEMISMATCH) for a 2 MiB request the map cannot satisfy;
    /// CF=1 when nothing changed. #UD without SNP.
    func pvalidate() throws(Fault) {
        guard let c = confidential, let rmp = c.rmp else { throw Fault.ud }
        try requireCPL0()
        let large = gpr[1] & 1 != 0, validate = gpr[2] & 1 != 0
        let linear = gpr[0] & (large ? ~0x1F_FFFF : ~0xFFF)
        // Translate through the guest's tables without the reverse-map check it is about to change.
        invalidatePage(linear)
        pvalidateWalk = true
        defer { pvalidateWalk = false }
        let host = try translate(linear, write: false, user: false)
        let gpa = pvalidateGuestPage << 12
        invalidatePage(linear)
        c.counters.validations &+= 1
        let count = large ? 512 : 1
        let firstFrame = Int(host >> 12)
        var result: UInt64 = 0
        var changed = false
        if firstFrame + count > rmp.count || host >= ramSize {
            result = 1
        } else {
            for k in 0..<count {
                let f = firstFrame + k
                if rmp.owned[f] == 0 || Int(rmp.guestPage[f]) != Int(gpa >> 12) + k { result = large ? 6 : 1; break }
            }
        }
        if result == 0 {
            for k in 0..<count {
                let f = firstFrame + k
                let was = rmp.flags[f] & ReverseMap.Flag.validated != 0
                if was != validate {
                    changed = true
                    c.counters.pagesValidated &+= 1
                    rmp.flags[f] = validate ? rmp.flags[f] | ReverseMap.Flag.validated : rmp.flags[f] & ~ReverseMap.Flag.validated
                }
                if large { rmp.flags[f] |= ReverseMap.Flag.large } else { rmp.flags[f] &= ~ReverseMap.Flag.large }
            }
            if changed { dropCachedTranslations() }
        }
        gpr[0] = result
        rflags = (rflags & ~Flag.arithmetic) | (result == 0 && !changed ? Flag.cf : 0)
    }

    /// CPUID 0x8000001F (AMD memory encryption): EAX bit 1 SEV, bit 4 SNP; EBX[5:0] the C-bit.
    func confidentialCPUID() -> (a: UInt32, b: UInt32)? {
        guard let c = confidential else { return nil }
        return ((1 << 1) | (c.mode == .snp ? 1 << 4 : 0), UInt32(ConfidentialLayout.cBitPosition))
    }
}
