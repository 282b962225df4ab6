import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestImages
import VirtCore
import VMM

/// Scenario S1: the same status device as trapped port-I/O registers and as registers on
/// a shared guest page that the VMM scans on a timer. The `status-device` guest makes
/// `reads` status reads and `writes` control writes at CPL3 in each form.
package struct PioVsMmioLab: Sendable {
    package var engine: EngineChoice
    package var reads: UInt64 = 1_000_000
    package var writes: UInt64 = 10_000
    /// KVM: how often the host timer kicks the vCPU to scan the page.
    package var tickSeconds = 0.001
    /// Software engine: preemption-timer period in guest instructions.
    package var tickInstructions: UInt64 = 100_000

    package init(engine: EngineChoice) { self.engine = engine }

    package struct Form: Codable, Sendable {
        package var form: String
        package var exits: UInt64
        /// Exits by reason name.
        package var exitsByReason: [String: UInt64]
        package var wallSeconds: Double
        package var handledControlWrites: UInt64
        package var controlWritesIssued: UInt64
        package var statusReads: UInt64
        /// Timer ticks (page form: scans of the dirty state).
        package var ticks: UInt64
        /// Scans that found the page written.
        package var dirtyScans: UInt64
        package var guestOutput: String
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var cpl: Int = 3
        package var tick: String
        package var forms: [Form]
    }

    /// One step per form reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        progress.begin(steps: 2)
        progress.step("port I/O")
        let port = try runForm(page: false)
        progress.step("shared page")
        let page = try runForm(page: true)
        progress.finish()
        let tick = engine == .kvm ? "host timer every \(tickSeconds * 1000) ms" : "preemption timer every \(tickInstructions) instructions"
        return Result(engine: engine.rawValue, tick: tick, forms: [port, page])
    }

    func runForm(page: Bool) throws -> Form {
        let guest = try GuestProgram.load("status-device")
        var config = MachineConfiguration(memorySize: 32 << 20, commandLine: "reads=\(reads) writes=\(writes) page=\(page ? 1 : 0)",
                                          timeoutSeconds: 600)
        let output = GuestOutput()
        let engine = try EngineSelection.make(self.engine)
        if page {
            config.tickSeconds = tickSeconds
            config.tickInstructions = tickInstructions
        }
        let machine = try Machine(image: guest, configuration: config, engine: engine, serialOutput: output.append)
        let device = StatusDevice()
        try machine.attach(device, firstPort: StatusDevice.firstPort, count: StatusDevice.portCount)
        var statusPage: StatusPage?
        var onTick: (@Sendable () -> Void)?
        if page {
            let sp = try StatusPage(memory: machine.memory, address: BootLayout.statusPageAddress)
            try machine.listDevice(type: .statusPage, base: sp.address, size: 4096)
            let vm = try machine.vm.require(DirtyPageLogging.self, .dirtyLogging, neededBy: "the shared-page device")
            try vm.setDirtyLogging(true)
            onTick = {
                // The vCPU is stopped at this timer exit: fetch the log, then serve the page.
                let written = (try? vm.fetchDirtyLog()[sp.pageNumber]) ?? false
                _ = try? sp.scan(pageWasWritten: written)
            }
            statusPage = sp
        }
        let result = try machine.run(onTick: onTick)
        let text = output.text
        guard result.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "\(page ? "page" : "port") form", reason: result.stopReason.summary, output: text)
        }
        var byReason: [String: UInt64] = [:]
        for r in ExitReason.allCases where result.statistics[r].count > 0 { byReason[r.name] = result.statistics[r].count }
        return Form(form: page ? "shared page" : "port I/O", exits: result.statistics.totalExits, exitsByReason: byReason,
                    wallSeconds: Double(result.wallNanoseconds) / 1e9,
                    handledControlWrites: page ? statusPage?.handledCommands ?? 0 : device.handledCommands,
                    controlWritesIssued: writes, statusReads: reads, ticks: machine.ticks,
                    dirtyScans: statusPage?.dirtyScans ?? 0, guestOutput: text)
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.forms.map { f in
            [f.form, String(f.statusReads), String(f.controlWritesIssued), String(f.exits),
             f.wallSeconds.fixed(3), String(f.handledControlWrites), String(f.ticks)]
        }
        var notes: [String] = []
        if r.forms.count == 2 {
            let (p, s) = (r.forms[0], r.forms[1])
            notes.append("port form: every status read and control write is an exit (\(p.exits) exits for \(p.statusReads + p.controlWritesIssued) accesses), "
                + "\((p.wallSeconds * 1e6 / Double(max(p.statusReads + p.controlWritesIssued, 1))).fixed(2)) µs of wall time per access.")
            notes.append("page form: accesses are plain memory operations; the \(s.exits) exits are the timer's (\(s.ticks) ticks, \(s.dirtyScans) found the page dirty) plus the guest's console and exit. "
                + "Control writes between two scans are handled together, so the page form trades exits for latency: up to one tick (\(r.tick)).")
            if s.wallSeconds > 0 { notes.append("wall-time ratio port/page: \((p.wallSeconds / s.wallSeconds).fixed(1))×") }
        }
        return LabTable(title: "S1 status device: trapped port I/O vs shared page (\(r.engine) engine, guest at CPL3)",
                        columns: ["form", "status reads", "control writes", "exits", "wall s", "handled writes", "timer ticks"],
                        rows: rows, notes: notes)
    }

    package static func chart(_ r: Result) -> BarChart {
        BarChart(title: "S1 on the \(r.engine) engine: exits and wall time", categories: r.forms.map(\.form),
                 series: [("exits", r.forms.map { Double($0.exits) }), ("wall time (µs)", r.forms.map { $0.wallSeconds * 1e6 })],
                 yLabel: "count / µs", logarithmic: true)
    }
}
