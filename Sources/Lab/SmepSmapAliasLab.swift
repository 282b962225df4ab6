import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VirtCore
import VMM

/// Scenario S10: security invariants inside guests. The `smep-smap` guest builds an address
/// space with a supervisor-only kernel and three mappings of one physical page — user
/// (read-only, executable), kernel (writable, not executable) and kernel-executable — and
/// probes every access of the permission matrix under each SMEP/SMAP/RFLAGS.AC setting and
/// CR0.WP. The lab holds each observed outcome (completed, or #PF with error code and CR2)
/// against the architectural rules written out here, on the software engine in both paging
/// modes and on KVM when usable. A second matrix sets mode-based execute control (MBEC) in
/// the second-level table: the VMM denies user or supervisor execution of the page directly,
/// and the violation reaches it as an exit whose qualification says which.
package struct SmepSmapAliasLab: Sendable {
    /// Guest addresses and physical page (Guests/smep-smap/main.c).
    static let userSpace: UInt64 = 0x80_0000_0000
    static let aliasPage = 0x7FF

    /// One probe of the guest: who accesses what, how, through which mapping.
    package struct Probe: Sendable, Codable {
        package var name: String
        package var mode: String       // "kernel" (CPL0) or "user" (CPL3)
        package var access: String     // read, write, execute, implicit read
        package var mapping: String
        package var address: UInt64
        /// The guest mapping's U/S bit.
        package var userMapping: Bool
        package var writable: Bool
        package var executable: Bool
    }

    package static let probes: [Probe] = [
        Probe(name: "k-read-user", mode: "kernel", access: "read", mapping: "user data (RW, NX)", address: userSpace + 0x2000, userMapping: true, writable: true, executable: false),
        Probe(name: "k-write-user", mode: "kernel", access: "write", mapping: "user data (RW, NX)", address: userSpace + 0x2000, userMapping: true, writable: true, executable: false),
        Probe(name: "k-exec-user-alias", mode: "kernel", access: "execute", mapping: "user alias (RO, X)", address: userSpace + 0x20, userMapping: true, writable: false, executable: true),
        Probe(name: "k-read-kernel-alias", mode: "kernel", access: "read", mapping: "kernel alias (RW, NX)", address: userSpace + 0x1000, userMapping: false, writable: true, executable: false),
        Probe(name: "k-exec-kernel-alias", mode: "kernel", access: "execute", mapping: "kernel alias (RW, NX)", address: userSpace + 0x1020, userMapping: false, writable: true, executable: false),
        Probe(name: "k-exec-kx-alias", mode: "kernel", access: "execute", mapping: "kernel exec alias (RO, X)", address: userSpace + 0x6020, userMapping: false, writable: false, executable: true),
        Probe(name: "k-read-user-alias", mode: "kernel", access: "read", mapping: "user alias (RO, X)", address: userSpace, userMapping: true, writable: false, executable: true),
        Probe(name: "k-implicit-ldt-user", mode: "kernel", access: "implicit read (LDT)", mapping: "user page holding the LDT", address: userSpace + 0x7000, userMapping: true, writable: true, executable: false),
        Probe(name: "k-write-kernel-ro", mode: "kernel", access: "write", mapping: "kernel read-only", address: userSpace + 0x3000, userMapping: false, writable: false, executable: false),
        Probe(name: "u-exec-user-alias", mode: "user", access: "execute", mapping: "user alias (RO, X)", address: userSpace + 0x10, userMapping: true, writable: false, executable: true),
        Probe(name: "u-read-kernel-alias", mode: "user", access: "read", mapping: "kernel alias (RW, NX)", address: userSpace + 0x1000, userMapping: false, writable: true, executable: false),
        Probe(name: "u-write-user-alias", mode: "user", access: "write", mapping: "user alias (RO, X)", address: userSpace, userMapping: true, writable: false, executable: true),
    ]

    /// What an access did.
    package enum Outcome: Codable, Sendable, Equatable, CustomStringConvertible {
        case completed
        case pageFault(errorCode: UInt32, cr2: UInt64)
        /// A second-level violation: the VMM saw an exit with this qualification.
        case secondLevelViolation(access: String, allowed: String, userAddress: Bool)
        case notRun(String)

        package var description: String {
            switch self {
            case .completed: return "ok"
            case let .pageFault(code, cr2): return "#PF \(String(code, radix: 16)) @\(String(cr2, radix: 16))"
            case let .secondLevelViolation(access, allowed, user): return "EPT \(access) (allows \(allowed), \(user ? "user" : "supervisor") address)"
            case let .notRun(why): return "not run: \(why)"
            }
        }
    }

    /// The architectural rules (Intel SDM Vol. 3 §4.6): the outcome of `p` under the settings.
    package static func expected(_ p: Probe, smep: Bool, smap: Bool, wp: Bool, ac: Bool) -> Outcome {
        let user = p.mode == "user"
        let write = p.access == "write", execute = p.access == "execute", implicit = p.access.hasPrefix("implicit")
        let code: UInt32 = 1 | (write ? 2 : 0) | (user ? 4 : 0) | (execute ? 0x10 : 0)
        let fault = Outcome.pageFault(errorCode: code, cr2: p.address)
        if user && !p.userMapping { return fault }
        if write && !p.writable && (user || wp) { return fault }
        if execute && !p.executable { return fault }
        if !user && p.userMapping && execute && smep { return fault }
        if !user && p.userMapping && !execute && smap && (!ac || implicit) { return fault }
        return .completed
    }

    /// A second-level configuration of the alias page for the MBEC matrix.
    package struct SecondLevelSetting: Sendable, Codable {
        package var mbec: Bool
        package var permissions: PagePermissions
        package var name: String
    }

    package static let secondLevelSettings: [SecondLevelSetting] = [
        SecondLevelSetting(mbec: false, permissions: [.read, .write, .execute], name: "MBEC off, EPT RWX"),
        SecondLevelSetting(mbec: false, permissions: [.read, .write], name: "MBEC off, EPT RW"),
        SecondLevelSetting(mbec: true, permissions: [.read, .write, .userExecute], name: "MBEC on, EPT RW + user X (no supervisor X)"),
        SecondLevelSetting(mbec: true, permissions: [.read, .write, .execute], name: "MBEC on, EPT RW + supervisor X (no user X)"),
    ]
    static let mbecProbes = ["k-exec-user-alias", "k-exec-kx-alias", "u-exec-user-alias"]

    /// MBEC rules: the guest allows each of these (SMEP off); the second level decides by
    /// the mapping's U/S bit, not the CPL.
    package static func expected(_ p: Probe, _ s: SecondLevelSetting) -> Outcome {
        let bit: PagePermissions = s.mbec && p.userMapping ? .userExecute : .execute
        if s.permissions.contains(bit) { return .completed }
        return .secondLevelViolation(access: "execute", allowed: describe(s.permissions), userAddress: p.userMapping)
    }

    static func describe(_ p: PagePermissions) -> String {
        (p.contains(.read) ? "R" : "") + (p.contains(.write) ? "W" : "") + (p.contains(.execute) ? "X" : "") + (p.contains(.userExecute) ? "Xu" : "")
    }

    package struct Cell: Codable, Sendable {
        package var probe: String
        package var mode: String
        package var access: String
        package var mapping: String
        package var settings: String
        package var expected: Outcome
        /// By engine configuration ("software/nested", "software/shadow", "kvm").
        package var observed: [String: Outcome]
        package var unexpected: [String]
    }

    package struct Result: Codable, Sendable {
        package var engines: [String]
        package var notes: [String]
        package var cells: [Cell]
        package var aliasRewrite: [String: String]
        package var unexpectedCells: Int
    }

    package var useKVM = true
    package init() {}

    /// One step per engine's matrix run and per MBEC probe reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        var engines: [(name: String, engine: EngineChoice, paging: PagingMode, cmdline: String)] = [
            ("software/nested", .software, .nested, ""), ("software/shadow", .software, .shadow, ""),
        ]
        var notes: [String] = []
        if useKVM, (try? EngineSelection.make(.kvm)) != nil {
            // This host's nested KVM emulates CPL0 code and cannot emulate STAC/CLAC: AC is set with POPF there.
            engines.append(("kvm", .kvm, .nested, "popf=1"))
        } else {
            notes.append("kvm: not run (/dev/kvm unusable or --no-kvm)")
        }
        var observed: [String: [String: Outcome]] = [:]   // cell key → engine → outcome
        var alias: [String: String] = [:]
        progress.begin(steps: engines.count + Self.secondLevelSettings.count * Self.mbecProbes.count)
        for e in engines {
            progress.step("\(e.name): the permission matrix")
            let out = try runGuest(e.engine, paging: e.paging, commandLine: e.cmdline, setting: nil).output
            let features = Self.features(out)
            if !features.smep { notes.append("\(e.name): the CPU does not expose SMEP; SMEP cells not run") }
            if !features.smap { notes.append("\(e.name): the CPU does not expose SMAP; SMAP and AC cells not run") }
            for line in out.split(separator: "\n") where line.hasPrefix("cell ") {
                guard let (key, outcome) = Self.parseCell(String(line)) else { continue }
                observed[key, default: [:]][e.name] = outcome
            }
            alias[e.name] = out.split(separator: "\n").first { $0.hasPrefix("alias ") }.map(String.init) ?? "missing"
        }
        var cells: [Cell] = []
        for smep in [false, true] {
            for smap in [false, true] {
                for ac in [false, true] {
                    for p in Self.probes {
                        let key = Self.key(p.name, smep: smep, smap: smap, wp: true, ac: ac)
                        cells.append(cell(p, settings: "SMEP \(smep ? 1 : 0) SMAP \(smap ? 1 : 0) AC \(ac ? 1 : 0) WP 1",
                                          expected: Self.expected(p, smep: smep, smap: smap, wp: true, ac: ac),
                                          observed: observed[key] ?? [:], engines: engines.map(\.name)))
                    }
                }
            }
        }
        let ro = Self.probes.first { $0.name == "k-write-kernel-ro" }!
        cells.append(cell(ro, settings: "SMEP 0 SMAP 0 AC 0 WP 0", expected: Self.expected(ro, smep: false, smap: false, wp: false, ac: false),
                          observed: observed[Self.key(ro.name, smep: false, smap: false, wp: false, ac: false)] ?? [:], engines: engines.map(\.name)))
        // MBEC: the software engine's second-level model, nested paging.
        for s in Self.secondLevelSettings {
            for name in Self.mbecProbes {
                let p = Self.probes.first { $0.name == name }!
                progress.step("software/nested: \(s.name), \(name)")
                let index = Self.probes.firstIndex { $0.name == name }! + 1
                let r = try runGuest(.software, paging: .nested, commandLine: "probe=\(index) once=1", setting: s)
                let outcome: Outcome
                if let v = r.violations.first {
                    outcome = .secondLevelViolation(access: v.accessKind.contains(.execute) ? "execute" : v.accessKind.contains(.write) ? "write" : "read",
                                                    allowed: Self.describe(v.allowed), userAddress: v.userAddress)
                } else {
                    outcome = r.output.split(separator: "\n").first { $0.hasPrefix("cell ") }.flatMap { Self.parseCell(String($0))?.1 } ?? .notRun("no result")
                }
                cells.append(cell(p, settings: "SMEP 0 SMAP 0, \(s.name)", expected: Self.expected(p, s), observed: ["software/nested": outcome],
                                  engines: ["software/nested"]))
            }
        }
        progress.finish()
        return Result(engines: engines.map(\.name), notes: notes, cells: cells, aliasRewrite: alias,
                      unexpectedCells: cells.filter { !$0.unexpected.isEmpty }.count)
    }

    private func cell(_ p: Probe, settings: String, expected: Outcome, observed: [String: Outcome], engines: [String]) -> Cell {
        var o = observed
        for e in engines where o[e] == nil { o[e] = .notRun("no result") }
        let unexpected = engines.filter { e in
            if case .notRun = o[e]! { return false }  // reported, not counted: the host lacks the feature
            return o[e]! != expected
        }
        return Cell(probe: p.name, mode: p.mode, access: p.access, mapping: p.mapping, settings: settings, expected: expected,
                    observed: o, unexpected: unexpected)
    }

    struct GuestRun { var output: String; var violations: [SecondLevelViolation] }

    private func runGuest(_ engine: EngineChoice, paging: PagingMode, commandLine: String, setting: SecondLevelSetting?) throws -> GuestRun {
        let out = GuestOutput()
        var config = MachineConfiguration(memorySize: 32 << 20, commandLine: commandLine, timeoutSeconds: 600)
        config.paging = paging
        let m = try Machine(image: try GuestProgram.load("smep-smap"), configuration: config, engine: try EngineSelection.make(engine),
                            serialOutput: out.append)
        let log = ViolationLog()
        if let s = setting {
            var mbec = try m.vm.require((any ModeBasedExecuteControl).self, .modeBasedExecute, neededBy: "lab smep-smap-alias")
            mbec.modeBasedExecute = s.mbec
            let table = try m.vm.require((any SecondLevelTranslation).self, .secondLevelTranslation, neededBy: "lab smep-smap-alias")
            table.setPermissions(s.permissions, pages: Self.aliasPage..<(Self.aliasPage + 1))
            let reporter = m.vcpu(0) as? any SecondLevelViolationReporting
            // The VMM's policy here: log the violation with its qualification, then allow
            // the page so the guest goes on (an IDS that watches rather than kills).
            m.setSecondLevelViolationHandler { gpa, access in
                guard gpa >> 12 == UInt64(Self.aliasPage) else { return false }
                log.append(reporter?.lastSecondLevelViolation
                           ?? SecondLevelViolation(gpa: gpa, linear: nil, access: access, allowed: s.permissions, userAddress: false, modeBasedExecute: s.mbec))
                table.setPermissions(.all, pages: Self.aliasPage..<(Self.aliasPage + 1))
                return true
            }
        }
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "smep-smap on \(engine.rawValue) (\(paging))", reason: r.stopReason.summary, output: out.text)
        }
        return GuestRun(output: out.text, violations: log.entries)
    }

    static func key(_ name: String, smep: Bool, smap: Bool, wp: Bool, ac: Bool) -> String {
        "\(name) smep=\(smep ? 1 : 0) smap=\(smap ? 1 : 0) wp=\(wp ? 1 : 0) ac=\(ac ? 1 : 0)"
    }

    /// "cell NAME smep=S smap=M wp=W ac=A fault=F code=0xC cr2=0xR" → (key, outcome).
    static func parseCell(_ line: String) -> (String, Outcome)? {
        let f = line.split(separator: " ").map(String.init)
        guard f.count == 9 else { return nil }
        func value(_ s: String) -> UInt64? {
            guard let v = s.split(separator: "=").last else { return nil }
            return v.hasPrefix("0x") ? UInt64(v.dropFirst(2), radix: 16) : UInt64(v)
        }
        guard let fault = value(f[6]), let code = value(f[7]), let cr2 = value(f[8]) else { return nil }
        return (f[1...5].joined(separator: " "), fault != 0 ? .pageFault(errorCode: UInt32(code), cr2: cr2) : .completed)
    }

    static func features(_ output: String) -> (smep: Bool, smap: Bool) {
        let line = output.split(separator: "\n").first { $0.hasPrefix("features ") } ?? ""
        return (line.contains("smep=1"), line.contains("smap=1"))
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.cells.map { c in
            [c.probe, c.mode, c.access, c.mapping, c.settings, c.expected.description]
                + r.engines.map { e in c.observed[e].map { $0.description + (c.unexpected.contains(e) ? "  ✗" : "") } ?? "" }
        }
        var notes = r.notes
        notes.append("#PF codes: bit 0 protection (not absent), 1 write, 2 user, 4 instruction fetch. SMEP: no supervisor fetch from a user mapping; SMAP: no supervisor data access to one unless RFLAGS.AC is set (STAC) — and never for implicit accesses such as the LDT read of a segment load; CR0.WP=0 lets the kernel write read-only pages.")
        notes.append("the alias: one physical page mapped user read-only+executable and kernel writable+NX while the second level grants RWX; the kernel rewrote the user's code through its alias — " + r.aliasRewrite.map { "\($0.key): \($0.value)" }.sorted().joined(separator: "; "))
        notes.append("MBEC rows: the VMM sets the alias page's second-level permissions; with MBEC the execute bit is chosen by the guest mapping's U/S bit (Xu for user mappings, X for supervisor ones), not by the CPL. A violation is an exit whose qualification the VMM reads; it logs it and lets the guest go on.")
        notes.append("unexpected cells: \(r.unexpectedCells) (✗ marks an observation that differs from the rule).")
        return LabTable(title: "S10 SMEP/SMAP/WP, the user/kernel alias and MBEC: expected vs observed per engine",
                        columns: ["probe", "mode", "access", "mapping", "settings", "expected"] + r.engines,
                        rows: rows, notes: notes)
    }

    package static func chart(_ r: Result) -> BarChart {
        func count(_ e: String, _ pred: (Outcome) -> Bool) -> Double {
            Double(r.cells.filter { c in c.observed[e].map(pred) ?? false }.count)
        }
        return BarChart(title: "S10 permission matrix outcomes", categories: r.engines,
                        series: [("completed", r.engines.map { e in count(e) { $0 == .completed } }),
                                 ("#PF", r.engines.map { e in count(e) { if case .pageFault = $0 { return true } else { return false } } }),
                                 ("EPT violation", r.engines.map { e in count(e) { if case .secondLevelViolation = $0 { return true } else { return false } } }),
                                 ("unexpected", r.engines.map { e in Double(r.cells.filter { $0.unexpected.contains(e) }.count) })],
                        yLabel: "cells")
    }
}

/// Violations the lab's handler saw (from the vCPU thread).
final class ViolationLog: @unchecked Sendable {
    // SAFETY: every access holds `lock`.
    private let lock = HostLock()
    private var items: [SecondLevelViolation] = []
    func append(_ v: SecondLevelViolation) { lock.withLock { items.append(v) } }
    var entries: [SecondLevelViolation] { lock.withLock { items } }
}
