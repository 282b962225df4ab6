import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtCore
import VMM

/// Scenario S11: confidential VMs on the software engine (docs/confidential-vm.md). The
/// host's view of a guest's private pages (ciphertext) and shared pages (plaintext); second-
/// level permissions still enforced; the four host attacks without and with the reverse
/// map; and what encryption costs (guest MIPS, page-walk time, working-set traffic).
package struct ConfidentialVMLab: Sendable {
    /// `compute` scale for the cost rows.
    package var computeScale = 1
    /// Pages the `working-set` guest scatters over (more than the TLB's 1024 entries: every
    /// access tends to walk), and the decrypted working set it runs with.
    package var walkPages = 2048
    package var workingSetPages = 4096
    /// Only these attacks (all by default).
    package var attacks = ConfidentialAttack.allCases

    package init() {}

    package struct HostViewRow: Codable, Sendable {
        package var mode: String
        /// Bits per byte of the guest's 16 data pages as the host reads them.
        package var privateEntropy: Double
        package var patternFoundInPrivatePages: Bool
        /// The shared region's page the guest copied its first data page into.
        package var sharedEntropy: Double
        package var patternFoundInSharedPage: Bool
        /// Anywhere in host memory outside the shared region.
        package var patternFoundElsewhere: Bool
    }

    package struct PermissionRow: Codable, Sendable {
        package var mode: String
        package var protection: String
        package var faults: Int
        package var guestResult: String
        package var patternSeenByVMM: Bool
    }

    package struct AttackRow: Codable, Sendable {
        package var attack: ConfidentialAttack
        package var mode: String
        package var hostAction: String
        package var hostWriteRefused: Bool
        package var guestResult: String
        package var detected: Bool
    }

    package struct CostRow: Codable, Sendable {
        package var workload: String
        package var mode: String
        package var seconds: Double
        package var instructions: UInt64
        package var mips: Double
        package var pageWalks: UInt64
        /// Run time per page walk: an upper bound on the walk's latency where walks dominate.
        package var nanosecondsPerWalk: Double
        package var decryptions: UInt64
        package var encryptions: UInt64
        package var evictions: UInt64
    }

    package struct Result: Codable, Sendable {
        package var hostView: [HostViewRow]
        package var permissions: [PermissionRow]
        package var attacks: [AttackRow]
        package var cost: [CostRow]
        package var computeSlowdownSNP: Double
    }

    static let modes: [ConfidentialMode?] = [nil, .sev, .snp]
    static func name(_ m: ConfidentialMode?) -> String { m?.rawValue ?? "none" }

    /// One step per guest run reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        let protections = [("write-protect data", PagePermissions([.read, .execute])), ("unmap image", PagePermissions())]
        progress.begin(steps: Self.modes.count * (1 + protections.count + 2) + attacks.count * 2)
        var hostView: [HostViewRow] = []
        for mode in Self.modes {
            progress.step("host view, \(Self.name(mode))")
            hostView.append(try hostViewRow(mode))
        }
        var permissions: [PermissionRow] = []
        for mode in Self.modes {
            for (name, allowed) in protections {
                progress.step("permissions, \(Self.name(mode)), \(name)")
                permissions.append(try permissionRow(mode, name, allowed))
            }
        }
        var attackRows: [AttackRow] = []
        for attack in attacks {
            for mode in [ConfidentialMode.sev, .snp] {
                progress.step("attack \(attack), \(mode.rawValue)")
                attackRows.append(try attackRow(attack, mode))
            }
        }
        var cost: [CostRow] = []
        for mode in Self.modes {
            progress.step("cost, compute, \(Self.name(mode))")
            cost.append(try costRow("compute", "scale=\(computeScale)", mode, workingSet: 1024))
        }
        for mode in Self.modes {
            progress.step("cost, working set, \(Self.name(mode))")
            cost.append(try costRow("working-set", "pages=\(walkPages) passes=8", mode, workingSet: workingSetPages))
        }
        progress.finish()
        let plain = cost[0].seconds, snp = cost[2].seconds
        return Result(hostView: hostView, permissions: permissions, attacks: attackRows, cost: cost,
                      computeSlowdownSNP: plain > 0 ? snp / plain : 0)
    }

    // MARK: Runs

    func hostViewRow(_ mode: ConfidentialMode?) throws -> HostViewRow {
        let victim = try ConfidentialVictimRun.run(mode)
        let m = victim.machine
        guard victim.result.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "confidential (\(Self.name(mode)))", reason: victim.result.stopReason.summary, output: victim.output)
        }
        let shared = ConfidentialLaunch.sharedRegion(ramSize: m.memory.size)
        let ram = try m.memory.read(at: 0, count: Int(m.memory.size))
        let sharedPage = Array(ram[Int(shared.lowerBound)..<Int(shared.lowerBound) + 4096])
        let hostView = victim.port.hostViewAtAttack
        return HostViewRow(mode: Self.name(mode), privateEntropy: ConfidentialVictimRun.entropy(hostView),
                           patternFoundInPrivatePages: ConfidentialVictimRun.containsPattern(hostView),
                           sharedEntropy: ConfidentialVictimRun.entropy(sharedPage),
                           patternFoundInSharedPage: ConfidentialVictimRun.containsPattern(sharedPage),
                           patternFoundElsewhere: ConfidentialVictimRun.containsPattern(Array(ram[0..<Int(shared.lowerBound)])))
    }

    func permissionRow(_ mode: ConfidentialMode?, _ name: String, _ allowed: PagePermissions) throws -> PermissionRow {
        let faults = Mutex(0)
        let victim = try ConfidentialVictimRun.run(mode) { m in
            let sl = try m.vm.require(SecondLevelTranslation.self, .secondLevelTranslation, neededBy: "lab confidential-vm")
            for s in m.image?.segments ?? [] where s.flags & 2 != 0 || allowed.isEmpty {
                sl.setPermissions(allowed, pages: Int(s.physicalAddress >> 12)..<Int((s.physicalAddress + s.memorySize + 0xFFF) >> 12))
            }
            m.setSecondLevelViolationHandler { gpa, _ in
                faults.withLock { $0 += 1 }
                sl.setPermissions(.all, pages: Int(gpa >> 12)..<Int(gpa >> 12) + 1)
                return true
            }
        }
        return PermissionRow(mode: Self.name(mode), protection: name, faults: faults.withLock { $0 },
                             guestResult: Self.guestResult(victim.result, victim.output),
                             patternSeenByVMM: ConfidentialVictimRun.containsPattern(victim.port.hostViewAtAttack))
    }

    func attackRow(_ attack: ConfidentialAttack, _ mode: ConfidentialMode) throws -> AttackRow {
        let victim = try ConfidentialVictimRun.run(mode, attack: attack)
        let result = Self.guestResult(victim.result, victim.output)
        let outcome = victim.port.outcome
        let refused = outcome?.hostWriteRefused != nil
        return AttackRow(attack: attack, mode: mode.rawValue, hostAction: outcome?.action ?? "-", hostWriteRefused: refused,
                         guestResult: result, detected: refused || result.hasPrefix("#VC"))
    }

    func costRow(_ guest: String, _ commandLine: String, _ mode: ConfidentialMode?, workingSet: Int) throws -> CostRow {
        let out = GuestOutput()
        var config = MachineConfiguration(memorySize: 64 << 20, commandLine: commandLine, timeoutSeconds: 600, guestName: guest)
        config.confidential = mode
        config.workingSetPages = workingSet
        let m = try Machine(image: try GuestProgram.load(guest), configuration: config,
                            engine: try EngineSelection.make(.software), serialOutput: out.append)
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "\(guest) (\(Self.name(mode)))", reason: r.stopReason.summary, output: out.text)
        }
        let seconds = Double(r.wallNanoseconds) / 1e9
        let instructions = m.executionCounts?.instructions ?? 0
        let walks = m.pagingReport?.counts.walks ?? 0
        let c = (m.vm as? any EncryptedMemory)?.confidentialCounters ?? ConfidentialCounters()
        return CostRow(workload: "\(guest) \(commandLine)", mode: Self.name(mode), seconds: seconds, instructions: instructions,
                       mips: seconds > 0 ? Double(instructions) / seconds / 1e6 : 0, pageWalks: walks,
                       nanosecondsPerWalk: walks > 0 ? Double(r.wallNanoseconds) / Double(walks) : 0,
                       decryptions: c.decryptions, encryptions: c.encryptions, evictions: c.evictions)
    }

    static func guestResult(_ r: RunResult, _ out: String) -> String {
        if out.contains("#VC") { return "#VC raised (reverse-map violation)" }
        if out.contains("DATA CHANGED") { return "computed on altered data" }
        if r.stopReason == .exitPort(status: 0) && out.contains("data intact") { return "data intact" }
        return r.stopReason.summary
    }

    // MARK: Report

    package static func table(_ r: Result) -> LabTable {
        var rows: [[String]] = []
        for h in r.hostView {
            rows.append(["host view", h.mode, "private pages: \(h.privateEntropy.fixed(2)) bits/byte, pattern \(h.patternFoundInPrivatePages ? "FOUND" : "not found")",
                         "shared page: \(h.sharedEntropy.fixed(2)) bits/byte, pattern \(h.patternFoundInSharedPage ? "found" : "not found"); elsewhere \(h.patternFoundElsewhere ? "FOUND" : "not found")"])
        }
        for p in r.permissions {
            rows.append(["permissions", p.mode, "\(p.protection): \(p.faults) second-level faults to the VMM",
                         "guest: \(p.guestResult); VMM saw the pattern: \(p.patternSeenByVMM ? "yes" : "no")"])
        }
        for a in r.attacks {
            rows.append(["attack \(a.attack)", a.mode, a.hostAction + (a.hostWriteRefused ? "" : ""),
                         "guest: \(a.guestResult) — \(a.detected ? "DETECTED" : "not detected")"])
        }
        for c in r.cost {
            rows.append(["cost", c.mode, c.workload,
                         "\(c.seconds.fixed(3)) s, \(c.mips.fixed(0)) MIPS, \(c.pageWalks) walks (\(c.nanosecondsPerWalk.fixed(0)) ns/walk), "
                             + "\(c.decryptions) decryptions, \(c.encryptions) encryptions, \(c.evictions) evictions"])
        }
        return LabTable(title: "S11 confidential VMs (software engine; AES-128-XTS with AES-NI, reverse map = SEV-SNP)",
                        columns: ["part", "mode", "what", "result"], rows: rows,
                        notes: [
                            "host view: the victim guest fills 16 private pages with a known pattern and copies one into the shared bounce region; the host reads the memfd.",
                            "permissions: the VMM write-protects the guest's writable segments or unmaps the whole image in the second-level table; it gets each fault's address and access, and lifts the restriction page by page.",
                            "attacks (at the guest's signal, vCPU stopped): remap a data page to another frame, replay a page's earlier ciphertext, alias two data pages onto one frame, DMA into a data page. SEV: the guest computes on the altered data; SNP: the host's writes are refused, and what the host can still do (remap, or reclaim-write-reassign) makes the guest's next access raise #VC.",
                            "compute with SNP took \(r.computeSlowdownSNP.fixed(2))× the unencrypted time; the working set is written back at every exit to the VMM, and a line costs one AES-XTS page (de/en)cryption when it moves.",
                        ])
    }

    package static func chart(_ r: Result) -> BarChart {
        let compute = r.cost.filter { $0.workload.hasPrefix("compute") }
        let walks = r.cost.filter { $0.workload.hasPrefix("working-set") }
        return BarChart(title: "S11: cost of memory encryption on the software engine",
                        categories: compute.map(\.mode),
                        series: [("compute MIPS / 100", compute.map { $0.mips / 100 }),
                                 ("working-set ns per page walk", walks.map(\.nanosecondsPerWalk)),
                                 ("private-page entropy (bits/byte)", r.hostView.map(\.privateEntropy))],
                        yLabel: "value (see series)")
    }
}
