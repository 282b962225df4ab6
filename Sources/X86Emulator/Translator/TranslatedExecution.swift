extension CPU {
    /// As `runBlock`, with translated code where there is some: runs up to `limit`
    /// instruction attempts, stopping early when an interpreted instruction sets
    /// `attention`. Returns the attempts made.
    func runTranslated(_ t: BlockTranslator, limit: Int) -> Int {
        typealias C = TranslatorContext
        let budgetAt = Int(C.budget)
        context.storeBytes(of: Int64(limit), toByteOffset: budgetAt, as: Int64.self)
        storeTranslatorState()
        flushTranslatorCachesIfStale()
        while true {
            let budget = Int(context.load(fromByteOffset: budgetAt, as: Int64.self))
            if budget <= 0 { break }
            var interpretCount = 1
            if let entry = translatedEntry(t) {
                let reason = t.enter(context, t.code + entry)
                let left = Int(context.load(fromByteOffset: budgetAt, as: Int64.self))
                instructions &+= UInt64(budget - left)
                rip = context.load(fromByteOffset: Int(C.rip), as: UInt64.self)
                switch TranslatorExit(rawValue: reason) {
                case .lookup: continue
                case .chain:
                    let site = context.load(fromByteOffset: Int(C.chainSite), as: UInt64.self)
                    let resets = t.resets
                    if translatedEntry(t) != nil, t.resets == resets, let b = translatedBlock(t, at: rip) {
                        t.chain(site: site, to: b.chainedEntry)
                    }
                    continue
                case .invalid:
                    dropJumpCacheEntry(rip)
                    continue
                case .budget: interpretCount = left
                default: break
                }
                if interpretCount == 0 { break }
            }
            // The interpreter takes over for a few instructions, on the real RFLAGS.
            loadTranslatorFlags()
            let attempts = runBlock(interpretCount)
            interpretedUnderTranslation &+= UInt64(attempts)
            let left = Int(context.load(fromByteOffset: budgetAt, as: Int64.self)) - attempts
            context.storeBytes(of: Int64(left), toByteOffset: budgetAt, as: Int64.self)
            storeTranslatorState()
            if attention { break }
            flushTranslatorCachesIfStale()
        }
        loadTranslatorFlags()
        return limit - Int(context.load(fromByteOffset: budgetAt, as: Int64.self))
    }

    /// What the translator's TLB entries depend on beyond the page tables: the CPL and,
    /// through SMAP, RFLAGS.AC.
    var translatorKey: UInt64 { UInt64(cs.dpl) | (rflags & Flag.ac) }

    /// Empties the translator's TLB and jump cache after a TLB flush or a new code page
    /// (`translatorFlushPending`) or a change of `translatorKey`.
    private func flushTranslatorCachesIfStale() {
        let key = translatorKey
        if translatorFlushPending || key != lastTranslatorKey {
            flushTranslatorCaches()
            lastTranslatorKey = key
        }
    }

    /// The host entry of the block at RIP (found in the jump cache, the block table, or
    /// translated now); nil when the instruction at RIP must be interpreted.
    private func translatedEntry(_ t: BlockTranslator) -> Int? {
        let r = rip
        let slot = jumpCacheSlot(r)
        if slot.load(as: UInt64.self) == r {
            return Int(slot.load(fromByteOffset: 8, as: UInt64.self) &- UInt64(UInt(bitPattern: t.code)))
        }
        let knownIndex = Int((r ^ (r >> 12)) & UInt64(BlockTranslator.interpretedEntries - 1))
        let known = t.interpreted + knownIndex
        if known.pointee.rip == r && known.pointee.gen == CodePages.generation(codeGens, Int(known.pointee.gpa >> 12)) { return nil }
        let gpa: UInt64
        do throws(Fault) { gpa = try translate(r, write: false, execute: true, user: cs.dpl == 3) } catch { return nil }
        guard gpa < ramSize else { return nil }
        var block = currentBlock(t, gpa: gpa, rip: r)
        if block == nil {
            block = translateBlock(t, rip: r, gpa: gpa)
            if block == nil {
                // Remember that this instruction is the interpreter's, until its page changes.
                let gen = CodePages.generation(codeGens, Int(gpa >> 12))
                t.blocks[gpa] = BlockTranslator.Block(rip: r, gen: gen, entry: BlockTranslator.Block.interpreted, chainedEntry: 0)
                known.pointee = .init(rip: r, gpa: gpa, gen: gen)
                translatorFills.note(.interpreted, knownIndex)
                return nil
            }
        }
        guard let b = block, b.entry != BlockTranslator.Block.interpreted else {
            if let b = block {
                known.pointee = .init(rip: r, gpa: gpa, gen: b.gen)
                translatorFills.note(.interpreted, knownIndex)
            }
            return nil
        }
        slot.storeBytes(of: r, as: UInt64.self)
        slot.storeBytes(of: UInt64(UInt(bitPattern: t.code + b.entry)), toByteOffset: 8, as: UInt64.self)
        translatorFills.note(.jumpCache, jumpCacheIndex(r))
        return b.entry
    }

    /// The translated block for `r` (nil when none is current).
    private func translatedBlock(_ t: BlockTranslator, at r: UInt64) -> BlockTranslator.Block? {
        let gpa: UInt64
        do throws(Fault) { gpa = try translate(r, write: false, execute: true, user: cs.dpl == 3) } catch { return nil }
        guard let b = currentBlock(t, gpa: gpa, rip: r), b.entry != BlockTranslator.Block.interpreted else { return nil }
        return b
    }

    /// The block table's entry for `gpa` if it was made for `rip` from the page's current code.
    private func currentBlock(_ t: BlockTranslator, gpa: UInt64, rip r: UInt64) -> BlockTranslator.Block? {
        guard let b = t.blocks[gpa], b.rip == r, b.gen == CodePages.generation(codeGens, Int(gpa >> 12)) else { return nil }
        return b
    }

    private func dropJumpCacheEntry(_ r: UInt64) {
        jumpCacheSlot(r).storeBytes(of: TranslatorContext.emptyJumpKey, as: UInt64.self)
    }

    /// The jump-cache slot of guest RIP `r` (the hash the shared lookup stub computes too).
    private func jumpCacheSlot(_ r: UInt64) -> UnsafeMutableRawPointer {
        context + Int(TranslatorContext.jumpCache) + jumpCacheIndex(r) * 16
    }

    private func jumpCacheIndex(_ r: UInt64) -> Int {
        Int((r ^ (r >> 12)) & UInt64(TranslatorContext.jumpCacheEntries - 1))
    }

    /// RFLAGS' arithmetic flags into the context (OF byte, LAHF byte), and FS/GS bases.
    private func storeTranslatorState() {
        let f = UInt16(rflags >> 11 & 1) | UInt16(truncatingIfNeeded: (rflags & 0xD5) | 2) << 8
        context.storeBytes(of: f, toByteOffset: Int(TranslatorContext.flags), as: UInt16.self)
        context.storeBytes(of: fs.base, toByteOffset: Int(TranslatorContext.fsBase), as: UInt64.self)
        context.storeBytes(of: gs.base, toByteOffset: Int(TranslatorContext.gsBase), as: UInt64.self)
    }

    private func loadTranslatorFlags() {
        let f = context.load(fromByteOffset: Int(TranslatorContext.flags), as: UInt16.self)
        rflags = (rflags & ~Flag.arithmetic) | UInt64(f >> 8) & 0xD5 | (UInt64(f & 1) << 11)
    }

    /// Empties the translator's TLB and jump cache (after TLB flushes, CPL changes, and when
    /// a page becomes a code page).
    func flushTranslatorCaches() {
        let tlb = context + Int(TranslatorContext.tlb)
        let jc = context + Int(TranslatorContext.jumpCache)
        func clearTLB(_ k: Int) {
            let e = tlb + k * TranslatorContext.tlbEntrySize
            e.storeBytes(of: TranslatorContext.emptyTag, as: UInt64.self)
            e.storeBytes(of: TranslatorContext.emptyTag, toByteOffset: 8, as: UInt64.self)
        }
        if translatorFills.overflowed {
            for k in 0..<TranslatorContext.tlbEntries { clearTLB(k) }
            for k in 0..<TranslatorContext.jumpCacheEntries {
                jc.storeBytes(of: TranslatorContext.emptyJumpKey, toByteOffset: k * 16, as: UInt64.self)
            }
            if let t = translator { t.interpreted.update(repeating: .init(), count: BlockTranslator.interpretedEntries) }
        } else {
            let interpreted = translator?.interpreted
            translatorFills.forEach { table, k in
                switch table {
                case .tlb: clearTLB(k)
                case .jumpCache: jc.storeBytes(of: TranslatorContext.emptyJumpKey, toByteOffset: k * 16, as: UInt64.self)
                case .interpreted: interpreted?[k] = .init()
                }
            }
        }
        translatorFills.reset()
        translatorFlushPending = false
    }

    /// A page just became a code page: the translator's TLB must no longer let stores to it
    /// skip the code-write check. Only the write tags of entries mapping it go; the rest of
    /// the TLB and the jump cache stay (a block's entry checks its page's generation).
    func dropTranslatorWrites(toPage page: Int) {
        let gens = UInt64(UInt(bitPattern: codeGens + page))
        let tlb = context + Int(TranslatorContext.tlb)
        func drop(_ k: Int) {
            let e = tlb + k * TranslatorContext.tlbEntrySize
            if e.load(fromByteOffset: 24, as: UInt64.self) == gens {
                e.storeBytes(of: TranslatorContext.emptyTag, toByteOffset: 8, as: UInt64.self)
            }
        }
        if translatorFills.overflowed {
            for k in 0..<TranslatorContext.tlbEntries { drop(k) }
        } else {
            translatorFills.forEach { table, k in if table == .tlb { drop(k) } }
        }
    }

    /// The miss helper's work (see `translatorMissHelper`).
    func translatorMiss(linear: UInt64, kind: UInt64) -> UInt64 {
        let size = kind & 0xFF
        let write = kind & 0x100 != 0
        guard (linear & 0xFFF) + size <= 0x1000 else { return 0 }
        let hostOffset: UInt64
        do throws(Fault) { hostOffset = try translate(linear, write: write, user: cs.dpl == 3) } catch { return 0 }
        guard hostOffset < ramSize else { return 0 }
        let frame = hostOffset & ~0xFFF
        if write && CodePages.hasCode(codeGens, Int(frame >> 12)) { return 0 }
        let vpn = linear >> 12
        let index = Int(vpn & UInt64(TranslatorContext.tlbEntries - 1))
        let e = context + Int(TranslatorContext.tlb) + index * TranslatorContext.tlbEntrySize
        translatorFills.note(.tlb, index)
        let readTag = e.load(as: UInt64.self), writeTag = e.load(fromByteOffset: 8, as: UInt64.self)
        if readTag != vpn && writeTag != vpn {
            e.storeBytes(of: TranslatorContext.emptyTag, toByteOffset: 8, as: UInt64.self)
        }
        let base = UInt64(UInt(bitPattern: ram))
        e.storeBytes(of: base &+ frame &- (vpn << 12), toByteOffset: 16, as: UInt64.self)
        e.storeBytes(of: UInt64(UInt(bitPattern: codeGens + Int(frame >> 12))), toByteOffset: 24, as: UInt64.self)
        e.storeBytes(of: vpn, as: UInt64.self)
        if write { e.storeBytes(of: vpn, toByteOffset: 8, as: UInt64.self) }
        return base &+ hostOffset
    }
}
