import VirtCore

extension SoftwareVirtualMachine: EncryptedMemory {
    public var confidentialMode: ConfidentialMode? { confidential?.mode }

    private func requireConfidential() throws -> ConfidentialMemory {
        guard let c = confidential else { throw ConfidentialError("this VM was not created confidential") }
        return c
    }

    public func launchUpdate(pages: Range<Int>) throws {
        let c = try requireConfidential()
        guard pages.lowerBound >= 0, pages.upperBound <= c.frameCount else { throw ConfidentialError("launch pages outside guest RAM") }
        c.encryptInPlace(frames: pages)
        if let rmp = c.rmp {
            for p in pages { rmp.assign(frame: secondLevel.frame(of: p), guestPage: p, validated: true, immutable: true) }
        }
    }

    public func finishLaunch(shared: Range<Int>) throws {
        let c = try requireConfidential()
        let sharedPages = shared.clamped(to: 0..<c.frameCount)
        try c.share(frames: sharedPages)
        c.encryptInPlace(frames: 0..<c.frameCount)
        if let rmp = c.rmp {
            for p in 0..<c.frameCount where !sharedPages.contains(p) {
                let f = secondLevel.frame(of: p)
                if rmp.owned[f] == 0 {
                    rmp.assign(frame: f, guestPage: p, validated: false, immutable: false)
                } else {
                    rmp.flags[f] &= ~ReverseMap.Flag.immutable  // launch finished: measured pages are the guest's to change
                }
            }
            memory.guardOwnedFrames(rmp.owned)
        }
        codePages.invalidateAll()
        secondLevel.invalidate()
    }

    public func flushWorkingSet() { dropWorkingSet(nil) }

    /// Writes back and drops the working set's lines of `frames` (nil: all); the vCPU's
    /// cached translations go at its next run (INVEPT).
    func dropWorkingSet(_ frames: Range<Int>?) {
        guard let c = confidential else { return }
        if let frames { c.dropFrames(frames) } else { c.dropAll() }
        secondLevel.invalidate()
    }

    public var confidentialCounters: ConfidentialCounters { confidential?.counters ?? ConfidentialCounters() }

    public func rmpEntry(frame: Int) -> RMPEntry? {
        guard let rmp = confidential?.rmp, frame >= 0, frame < rmp.count else { return nil }
        return rmp.entry(frame)
    }

    public func rmpUpdate(frame: Int, guestPage: Int?) throws {
        let c = try requireConfidential()
        guard let rmp = c.rmp else { throw ConfidentialError("RMPUPDATE needs SEV-SNP (this VM is SEV only)") }
        guard frame >= 0, frame < rmp.count else { throw ConfidentialError("frame \(frame) is outside guest RAM") }
        guard rmp.flags[frame] & ReverseMap.Flag.immutable == 0 else {
            throw ConfidentialError("RMPUPDATE of frame \(frame) refused: the entry is immutable")
        }
        c.dropFrames(frame..<(frame + 1))
        if let g = guestPage {
            guard g >= 0, g < c.frameCount else { throw ConfidentialError("guest page \(g) is outside guest RAM") }
            rmp.assign(frame: frame, guestPage: g, validated: false, immutable: false)
        } else {
            rmp.reclaim(frame: frame)
        }
        secondLevel.invalidate()
    }
}
