import Devices
import Dispatch
import FoundationEssentials
import Logging
import Synchronization
import VirtCore
import VMM

/// What the API configures before InstanceStart; frozen into a `Machine` when it starts.
struct PrebootConfiguration: Sendable {
    var vcpus = 1
    var memoryBytes: UInt64 = 64 << 20
    var engine: EngineChoice?
    var translation = true
    var guest: String?
    var commandLine = ""
    /// Drives and NICs by id, in the order they were first configured.
    var drives: [(id: String, path: String, readOnly: Bool)] = []
    var networkInterfaces: [(id: String, attachment: NetworkAttachment)] = []
    var balloonPages: UInt32?
    var snapshot: SnapshotLoadRequest?
}

/// Counters of operations done through the API (the engines' and devices' own counters are
/// read from the machine at scrape time).
struct OperatorCounters: Sendable {
    var snapshots: UInt64 = 0
    var snapshotPauseSeconds: Double = 0
    var snapshotTotalSeconds: Double = 0
    var copyOnWriteFaults: UInt64 = 0
    var migrations: UInt64 = 0
    var migrationDirtyPagesFetched: UInt64 = 0
    var migrationPagesSent: UInt64 = 0
}

/// The instance behind the API: its state machine (configuring → running → stopped), the
/// machine once there is one, and what each resource does. Thread-safe; the blocking
/// operations (snapshot, migrate) run on the caller's thread, never on an event loop.
public final class VMController: Sendable {
    enum Phase: Sendable {
        case configuring
        case running(since: UInt64)
        case stopped(reason: String)
    }

    private struct State: Sendable {
        var phase: Phase
        var preboot = PrebootConfiguration()
        var machine: Machine?
        var counters = OperatorCounters()
        var result: RunResult?
    }

    private let state: Mutex<State>
    private let finished = DispatchSemaphore(value: 0)
    private let serialOutput: @Sendable (UInt8) -> Void
    private let kvmPath: String
    let logger: Logger

    /// A controller for a machine that is already running (`run --api-sock`): configuration
    /// resources answer 400; the caller runs the machine.
    public init(running machine: Machine, logger: Logger = .silent) {
        state = Mutex(State(phase: .running(since: monotonicNanoseconds()), machine: machine))
        serialOutput = { _ in }
        kvmPath = "/dev/kvm"
        self.logger = logger
    }

    /// A controller with no VM yet (`serve`): it is configured, then InstanceStart builds and
    /// runs it on a thread of its own.
    public init(serialOutput: @escaping @Sendable (UInt8) -> Void, kvmPath: String = "/dev/kvm", logger: Logger = .silent) {
        state = Mutex(State(phase: .configuring))
        self.serialOutput = serialOutput
        self.kvmPath = kvmPath
        self.logger = logger
    }

    /// The running machine, if any.
    public var machine: Machine? { state.withLock { $0.machine } }

    /// Waits until the VM that InstanceStart started has stopped (or Stop came before any
    /// start); returns its result, nil if it never ran or failed to.
    public func waitUntilFinished() -> RunResult? {
        finished.wait()
        finished.signal()  // later waiters pass too
        return state.withLock { $0.result }
    }

    // MARK: Resources

    var info: InstanceInfo {
        state.withLock { s in
            let m = s.machine
            var info = InstanceInfo(state: "Not started", engine: m?.engine.name ?? s.preboot.engine?.rawValue,
                                    vcpus: m?.configuration.vcpuCount ?? s.preboot.vcpus,
                                    memoryBytes: m?.memory.size ?? s.preboot.memoryBytes,
                                    guest: m?.configuration.guestName ?? s.preboot.guest, uptimeSeconds: 0)
            switch s.phase {
            case .configuring: break
            case let .running(since):
                info.state = m?.isPaused == true ? "Paused" : "Running"
                info.uptimeSeconds = Double(monotonicNanoseconds() - since) / 1e9
                if let ended = m?.endReason {  // the guest ended; the run is winding down
                    info.state = "Stopped"
                    info.stopReason = ended.summary
                }
            case let .stopped(reason):
                info.state = "Stopped"
                info.stopReason = reason
            }
            return info
        }
    }

    /// The machine while it runs, or 409: also once its guest has ended (exited, halted,
    /// stopped, migrated away) while the run is still winding down, unless `evenIfEnded`.
    func runningMachine(for what: String, evenIfEnded: Bool = false) throws(APIError) -> Machine {
        try state.withLock { s throws(APIError) in
            guard case .running = s.phase, let m = s.machine else {
                throw .conflict("\(what) needs a running VM (the instance is \(Self.name(s.phase)))")
            }
            if !evenIfEnded, let ended = m.endReason {
                throw .conflict("\(what) needs a running VM (the VM has already ended: \(ended.summary))")
            }
            return m
        }
    }

    func setVMState(_ request: VMStateRequest) throws(APIError) {
        let m = try runningMachine(for: "PATCH /vm")
        switch request.state {
        case "Paused": m.pause(); logger.notice("VM paused")
        case "Resumed": m.resume(); logger.notice("VM resumed")
        default: throw .badRequest("state must be \"Paused\" or \"Resumed\", not \"\(request.state)\"")
        }
    }

    /// Changes the pre-boot configuration, or 400 once the VM has started.
    func configure(_ resource: String, _ change: (inout PrebootConfiguration) throws(APIError) -> Void) throws(APIError) {
        try state.withLock { s throws(APIError) in
            guard case .configuring = s.phase, s.machine == nil else {
                throw .badRequest("\(resource) configures a VM before InstanceStart; this one has started")
            }
            try change(&s.preboot)
        }
        logger.info("configured \(resource)")
    }

    func setMachineConfig(_ r: MachineConfigRequest) throws(APIError) {
        var engine: EngineChoice?
        if let name = r.engine {
            guard let e = EngineChoice(rawValue: name) else { throw .badRequest("engine must be \"kvm\" or \"software\", not \"\(name)\"") }
            engine = e
        }
        if let n = r.vcpuCount, !(1...BootLayout.maxVCPUs).contains(n) {
            throw .badRequest("vcpu_count must be between 1 and \(BootLayout.maxVCPUs)")
        }
        if let mib = r.memSizeMib {
            guard mib >= 2, mib <= 3072, mib % 2 == 0 else { throw .badRequest("mem_size_mib must be an even number from 2 to 3072") }
        }
        try configure("/machine-config") { c in
            if let n = r.vcpuCount { c.vcpus = n }
            if let mib = r.memSizeMib { c.memoryBytes = mib << 20 }
            if let engine { c.engine = engine }
            if let t = r.translation { c.translation = t }
        }
    }

    func setBootSource(_ r: BootSourceRequest) throws(APIError) {
        do { _ = try GuestProgram.load(r.guest) } catch { throw .badRequest("\(error)") }
        try configure("/boot-source") { c in
            c.guest = r.guest
            c.commandLine = r.bootArgs ?? ""
        }
    }

    func setDrive(id: String, _ r: DriveRequest) throws(APIError) {
        if let bodyID = r.driveId, bodyID != id { throw .badRequest("drive_id \"\(bodyID)\" differs from the path's \"\(id)\"") }
        guard !r.pathOnHost.isEmpty else { throw .badRequest("path_on_host is empty") }
        try configure("/drives/\(id)") { c throws(APIError) in
            let drive = (id: id, path: r.pathOnHost, readOnly: r.isReadOnly ?? false)
            if let i = c.drives.firstIndex(where: { $0.id == id }) { c.drives[i] = drive; return }
            guard c.drives.count + c.networkInterfaces.count < BootLayout.maxDevices else {
                throw .badRequest("at most \(BootLayout.maxDevices) devices per VM")
            }
            c.drives.append(drive)
        }
    }

    func setNetworkInterface(id: String, _ r: NetworkInterfaceRequest) throws(APIError) {
        if let bodyID = r.ifaceId, bodyID != id { throw .badRequest("iface_id \"\(bodyID)\" differs from the path's \"\(id)\"") }
        guard let attachment = NetworkAttachment(r.attachment) else {
            throw .badRequest("attachment \"\(r.attachment)\" is not switch:NAME or tap:IFNAME")
        }
        try configure("/network-interfaces/\(id)") { c throws(APIError) in
            if let i = c.networkInterfaces.firstIndex(where: { $0.id == id }) { c.networkInterfaces[i] = (id, attachment); return }
            guard c.drives.count + c.networkInterfaces.count < BootLayout.maxDevices else {
                throw .badRequest("at most \(BootLayout.maxDevices) devices per VM")
            }
            c.networkInterfaces.append((id, attachment))
        }
    }

    func setSnapshotToLoad(_ r: SnapshotLoadRequest) throws(APIError) {
        do { _ = try SnapshotFile(path: r.snapshotPath) } catch { throw .badRequest("\(error)") }
        try configure("/snapshot/load") { $0.snapshot = r }
        if r.resumeVm == true { try start() }
    }

    // MARK: Actions

    func perform(_ r: ActionRequest) throws(APIError) {
        switch r.actionType {
        case "InstanceStart": try start()
        case "Stop": break  // after the answer is sent (APIRouter)
        default: throw .badRequest("action_type must be \"InstanceStart\" or \"Stop\", not \"\(r.actionType)\"")
        }
    }

    /// Stops the VM (or, before it started, ends the instance).
    func stop() {
        let (machine, neverStarted) = state.withLock { s -> (Machine?, Bool) in
            if case .configuring = s.phase {
                s.phase = .stopped(reason: "stopped before it started")
                return (nil, true)
            }
            return (s.machine, false)
        }
        logger.notice("stop requested through the API")
        machine?.stop()
        if neverStarted { finished.signal() }
    }

    /// Builds the configured machine and runs it on a thread of its own.
    func start() throws(APIError) {
        let preboot = try state.withLock { s throws(APIError) -> PrebootConfiguration in
            guard case .configuring = s.phase, s.machine == nil else {
                throw .badRequest("InstanceStart: the VM has already started (it is \(Self.name(s.phase)))")
            }
            guard s.preboot.guest != nil || s.preboot.snapshot != nil else {
                throw .badRequest("InstanceStart needs PUT /boot-source (or PUT /snapshot/load) first")
            }
            return s.preboot
        }
        let machine: Machine
        do { machine = try build(preboot) } catch { throw .badRequest("the VM cannot start: \(error)") }
        let claimed = state.withLock { s -> Bool in
            guard case .configuring = s.phase, s.machine == nil else { return false }
            s.machine = machine
            s.phase = .running(since: monotonicNanoseconds())
            return true
        }
        guard claimed else { throw .conflict("InstanceStart: another request started the VM first") }
        logger.notice("VM started", metadata: ["engine": "\(machine.engine.name)", "guest": "\(machine.configuration.guestName)"])
        HostThread(name: "vm") { [self] in
            var stopReason = "failed"
            do {
                let result = try machine.run()
                stopReason = result.stopReason.summary
                state.withLock { $0.result = result }
            } catch {
                logger.error("the VM failed: \(error)")
                stopReason = "failed: \(error)"
            }
            logger.notice("VM stopped: \(stopReason)")
            state.withLock { $0.phase = .stopped(reason: stopReason) }
            finished.signal()
        }.detach()
    }

    private func build(_ c: PrebootConfiguration) throws -> Machine {
        if let load = c.snapshot {
            let snapshot = try SnapshotFile(path: load.snapshotPath)
            let engine = try EngineSelection.make(EngineChoice(rawValue: snapshot.metadata.engine) ?? .software, kvmPath: kvmPath)
            return try Machine(restoring: snapshot, engine: engine, lazy: load.lazy ?? false, serialOutput: serialOutput)
        }
        guard let guest = c.guest else { throw APIError.badRequest("no boot source") }
        let image = try GuestProgram.load(guest)
        let engine = try c.engine.map { try EngineSelection.make($0, kvmPath: kvmPath, translation: c.translation) }
            ?? EngineSelection.makeDefault(kvmPath: kvmPath, translation: c.translation) { logger.notice("\($0)") }
        let config = MachineConfiguration(memorySize: c.memoryBytes, vcpuCount: c.vcpus, commandLine: c.commandLine, guestName: guest)
        let machine = try Machine(image: image, configuration: config, engine: engine, serialOutput: serialOutput)
        for d in c.drives { try machine.addVirtioBlock(path: d.path, readOnly: d.readOnly) }
        for n in c.networkInterfaces { try machine.addVirtioNet(attachment: n.attachment) }
        if let pages = c.balloonPages { try machine.addVirtioBalloon(target: pages) }
        return machine
    }

    // MARK: Balloon

    func balloonInfo() throws(APIError) -> BalloonInfo {
        let (m, pending) = state.withLock { ($0.machine, $0.preboot.balloonPages) }
        guard let m else {
            guard let pending else { throw .badRequest("no balloon is configured (PUT /balloon before InstanceStart)") }
            return BalloonInfo(targetPages: pending, actualPages: 0, amountMib: pending / 256, hostBytes: 0)
        }
        guard let b = m.balloon else { throw .badRequest("this VM has no balloon (run it with --balloon, or PUT /balloon before InstanceStart)") }
        return BalloonInfo(targetPages: b.targetPages, actualPages: b.actualPages, amountMib: b.targetPages / 256,
                           hostBytes: m.memory.allocatedBytes)
    }

    static func pages(_ r: BalloonRequest) throws(APIError) -> UInt32 {
        switch (r.amountMib, r.targetPages) {
        case let (mib?, nil):
            guard mib <= UInt32.max / 256 else { throw .badRequest("amount_mib is too large") }
            return mib * 256
        case let (nil, pages?): return pages
        default: throw .badRequest("give amount_mib or target_pages (exactly one)")
        }
    }

    /// PUT /balloon: adds the device (before InstanceStart).
    func configureBalloon(_ r: BalloonRequest) throws(APIError) {
        let pages = try Self.pages(r)
        try configure("/balloon") { $0.balloonPages = pages }
    }

    /// PATCH /balloon: a new target for the running VM's balloon.
    func setBalloonTarget(_ r: BalloonRequest) throws(APIError) -> BalloonInfo {
        let pages = try Self.pages(r)
        let m = try runningMachine(for: "PATCH /balloon")
        guard let b = m.balloon else { throw .badRequest("this VM has no balloon (run it with --balloon, or PUT /balloon before InstanceStart)") }
        b.setTarget(pages: pages)
        logger.info("balloon target set", metadata: ["pages": "\(pages)"])
        return try balloonInfo()
    }

    func balloonStatistics() throws(APIError) -> BalloonStatisticsInfo {
        guard let m = machine, let b = m.balloon else { throw .badRequest("this VM has no balloon") }
        b.requestGuestStatistics()
        let s = b.statistics, g = b.guestStatistics
        return BalloonStatisticsInfo(targetPages: b.targetPages, actualPages: b.actualPages, inflatedPages: s.inflatedPages,
                                     deflatedPages: s.deflatedPages, discardedBytes: s.discardedBytes, returnedBytes: s.returnedBytes,
                                     rejectedPages: s.rejectedPages, freeMemory: g?.freeMemory, totalMemory: g?.totalMemory,
                                     availableMemory: g?.availableMemory)
    }

    // MARK: Snapshot and migration (blocking)

    func snapshot(_ r: SnapshotCreateRequest) throws(APIError) -> SnapshotReport {
        guard !r.snapshotPath.isEmpty else { throw .badRequest("snapshot_path is empty") }
        let m = try runningMachine(for: "PUT /snapshot/create")
        let report: SnapshotReport
        do { report = try m.snapshot(to: r.snapshotPath, note: r.note ?? "") } catch let error as MachineSnapshotError {
            if case .ended = error { throw .conflict("PUT /snapshot/create: \(error)") }  // ended during the request
            throw .badRequest("\(error)")
        } catch { throw .badRequest("\(error)") }
        state.withLock { s in
            s.counters.snapshots += 1
            s.counters.snapshotPauseSeconds += report.pauseSeconds
            s.counters.snapshotTotalSeconds += report.totalSeconds
            s.counters.copyOnWriteFaults += report.copyOnWriteFaults
        }
        logger.notice("snapshot written", metadata: ["path": "\(report.path)", "pause_ms": "\((report.pauseSeconds * 1000).fixed(2))"])
        return report
    }

    /// Runs a migration, handing each answer line to `emit`.
    func migrate(_ r: MigrateRequest, emit: @escaping (MigrationControlLine) -> Void) {
        do {
            let (address, options) = try r.parsed()
            // A post-copy migration that broke after the switch-over is resumed on a machine
            // that ended as migrated; Machine.migrate refuses what cannot be migrated.
            let m = try runningMachine(for: "PUT /migrate", evenIfEnded: true)
            logger.notice("migration started", metadata: ["destination": "\(r.destination)"])
            var lastRound = -1
            let report = try m.migrate(to: address, options: options) { p in
                if p.round != lastRound {
                    lastRound = p.round
                    self.state.withLock { $0.counters.migrationDirtyPagesFetched += UInt64(p.dirtyPages) }
                }
                emit(MigrationControlLine(progress: p))
            }
            state.withLock { s in
                s.counters.migrations += 1
                s.counters.migrationPagesSent += UInt64(report.pagesSent)
            }
            logger.notice("migration finished", metadata: ["destination": "\(report.destination)"])
            emit(MigrationControlLine(ok: true, report: report))
        } catch {
            logger.error("migration failed: \(error)")
            emit(MigrationControlLine(ok: false, error: "\(error)"))
        }
    }

    var counters: OperatorCounters { state.withLock { $0.counters } }

    static func name(_ phase: Phase) -> String {
        switch phase {
        case .configuring: return "not started"
        case .running: return "running"
        case .stopped: return "stopped"
        }
    }
}
